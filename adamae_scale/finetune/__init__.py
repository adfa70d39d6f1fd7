"""Fine-tuning, linear probing and multi-view evaluation of pre-trained encoders (``adamae-finetune``)."""
