"""The ground floor: what every layer above may use and which imports nothing else of ``adamae_scale``.

``weights`` (restricted un-pickling, streamed safetensors), ``atomic`` (write-then-rename files and folders),
``errors`` (one-line errors of both), ``pixels`` (the ImageNet normalisation of clips) and ``seeds`` (how a
seed is derived from the run's seed).
"""
