"""Flax linen modules: every sequence mixer takes x `[B,T,d_model]` and returns the same shape.

Importing this package registers every mixer with `mixers.registry`.
"""
from mixers.layers.attention import Attention
from mixers.layers.channel import GLU, MLP
from mixers.layers.common import GatedRMSNorm, RMSNorm, ShortConv
from mixers.layers.delta_net import DeltaNet, GatedDeltaNet
from mixers.layers.gla import GLA
from mixers.layers.hydra import Hydra
from mixers.layers.hyper_attention import HyperAttention
from mixers.layers.lightnet import LightNet
from mixers.layers.linear_attention import LinearAttention
from mixers.layers.mamba2 import Mamba2
from mixers.layers.monarch_mixer import MonarchMixer
from mixers.layers.monarch_mlp import MonarchMLP
from mixers.layers.retention import Retention
from mixers.layers.vssd import VSSD
