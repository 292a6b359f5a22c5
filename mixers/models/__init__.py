"""Backbones and task heads built from ConfigDicts."""
from mixers.layers.decode_cache import decode_capacity
from mixers.models.backbone import REMAT_POLICIES, Block, SequenceModel, stack_layers, unstack_layers
from mixers.models.build import build_model, check_config, default_config, lightnet_block_config
from mixers.models.classifier import Classifier, PatchEmbed
from mixers.models.language_model import LanguageModel
