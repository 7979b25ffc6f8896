"""Tiny-ONN: a sparse mixture of experts built from a dense teacher's own neurons.

Pipeline (each stage a function over a run folder; see DESIGN.md):
teacher → probe → cluster → assemble → train (SMK) → evaluate / explain.
"""

from tinyonn.config import DataConfig, PretrainConfig, ProbeConfig, TeacherModelConfig
from tinyonn.data import (
    Batch,
    EncodedSample,
    Example,
    collate,
    encode_example,
    encode_examples,
    iter_batches,
    load_probe_set,
    per_sample_loss,
    read_examples,
)
from tinyonn.errors import DataFormatError, TeacherNotFoundError, TinyONNError, UnsupportedArchitectureError
from tinyonn.assemble import assemble
from tinyonn.cluster import ClusterConfig, cluster
from tinyonn.model import TinyONNConfig, TinyONNForCausalLM
from tinyonn.plan import ExpertPlan
from tinyonn.probe import probe
from tinyonn.routing import RoutingConfig
from tinyonn.scores import ScoreConfig, score_store
from tinyonn.store import ScoreStore
from tinyonn.teacher import FFNLayer, dequantize, ffn_layout, load_teacher

__version__ = "0.1.0"

__all__ = [
    "Batch", "ClusterConfig", "DataConfig", "ExpertPlan", "ProbeConfig", "RoutingConfig", "TinyONNConfig",
    "TinyONNForCausalLM", "assemble", "cluster", "ScoreConfig", "ScoreStore", "probe", "score_store", "DataFormatError", "EncodedSample", "Example", "FFNLayer", "PretrainConfig",
    "TeacherModelConfig", "TeacherNotFoundError", "TinyONNError", "UnsupportedArchitectureError",
    "collate", "dequantize", "encode_example", "encode_examples", "ffn_layout", "iter_batches",
    "load_probe_set", "load_teacher", "per_sample_loss", "read_examples",
]
