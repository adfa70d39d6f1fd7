"""Checkpoint tools behind ``adamae-convert``: consolidate ZeRO checkpoints, export the encoder or a Hugging
Face VideoMAE model, import reference AdaMAE/VideoMAE checkpoints. Each module has one job:

- ``io``: restricted un-pickling, streamed safetensors writing, lazy reading, atomic output folders
- ``folder``: this project's output folders (``model.safetensors`` + ``config.json``, full or encoder-only)
- ``arch``: expected parameter shapes of a config and readable mismatch errors
- ``consolidate``: DeepSpeed ZeRO 0-3 → safetensors (through DeepSpeed's own ``zero_to_fp32``)
- ``encoder``: the encoder alone, in this project's or timm's naming
- ``reference``: the reference AdaMAE/VideoMAE key map and architecture inference
- ``hf``: → ``transformers`` ``VideoMAEForPreTraining``
- ``cli``: the ``adamae-convert`` command line

Submodules are imported on use, so DeepSpeed and transformers load only for the commands that need them.
"""
