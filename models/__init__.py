"""CrossDistil in pure PyTorch (no Kafka): configuration, features, backbones, losses, model and learner.

Import the submodules (``models.config``, ``models.features``, ``models.learner``...); this package file
imports nothing so that light users (``models.metrics``) do not pay for torch.
"""
