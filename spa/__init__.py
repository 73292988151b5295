"""spa: Select and Pack Attention (SPA) and the SPT backbone for vision transformers."""

from spa.attention import PackedAttention, packed_attention
from spa.gate import TokenGate
from spa.models.spa_block import SPABlock
from spa.packing import Packed, pack
from spa.selection import Selection

__version__ = "0.1.0"

__all__ = ["PackedAttention", "Packed", "SPABlock", "Selection", "TokenGate", "pack", "packed_attention"]
