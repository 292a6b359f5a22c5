"""Pure functions on arrays (no Flax): the math of each mixer, in several forms that tests hold equal."""
from mixers.ops import feature_maps, monarch_fft, positional
from mixers.ops.attention import attention
from mixers.ops.delta_rule import delta_rule, delta_rule_step
from mixers.ops.hyper_attention import hyper_attention
from mixers.ops.lightnet import lightnet
from mixers.ops.linear_attention import linear_attention, linear_attention_step
from mixers.ops.long_conv import long_conv, long_conv_matrix
from mixers.ops.monarch import block_diagonal, monarch, monarch_matrix, monarch_p, monarch_p_matrix
from mixers.ops.quasiseparable import quasiseparable, quasiseparable_matrix
from mixers.ops.recurrence import gated_linear_recurrence, mixing_matrix
from mixers.ops.ssd import ssd, ssd_matrix, ssd_step
