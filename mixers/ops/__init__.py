"""Pure functions on arrays (no Flax): the math of each mixer, in several forms that tests hold equal."""
from mixers.ops import feature_maps
from mixers.ops.attention import attention
from mixers.ops.linear_attention import linear_attention, linear_attention_step
from mixers.ops.recurrence import gated_linear_recurrence, mixing_matrix
