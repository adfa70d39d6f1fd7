"""Pictures of what a model does: where the sampler looks, what the decoder rebuilds, the error.

``panel`` draws one clip's rows (input, the sampler's p, the visible tokens, reconstruction, error),
``focus`` measures how much of the sampler's attention lands on moving tokens, ``cli`` is ``adamae-visualize``
(checkpoints or exported models on videos, shards or synthetic clips) and ``tensorboard`` puts the same picture
into a pre-training run's TensorBoard and ``RUN_DIR/visualize``.
"""
