"""spa: Select and Pack Attention (SPA) and the SPT backbone for vision transformers."""

from spa.attention import PackedAttention, packed_attention
from spa.compile import compile_model
from spa.gate import TokenGate
from spa.labels import batch_selection_labels, selection_labels
from spa.losses import selection_loss, selection_loss_from_targets
from spa.models import create_model, list_models
from spa.models.spa_block import SPABlock
from spa.models.spt import SPT
from spa.models.swin_weights import LoadResult, load_swin_weights
from spa.packing import Packed, pack
from spa.selection import Selection

__version__ = "0.1.0"

__all__ = [
    "SPT",
    "LoadResult",
    "Packed",
    "PackedAttention",
    "SPABlock",
    "Selection",
    "TokenGate",
    "batch_selection_labels",
    "compile_model",
    "create_model",
    "list_models",
    "load_swin_weights",
    "pack",
    "packed_attention",
    "selection_labels",
    "selection_loss",
    "selection_loss_from_targets",
]
