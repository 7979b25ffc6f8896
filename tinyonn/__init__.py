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
from tinyonn.plan import ExpertPlan
from tinyonn.probe import probe
from tinyonn.routing import RoutingConfig
from tinyonn.scores import ScoreConfig, score_store
from tinyonn.store import ScoreStore
from tinyonn.teacher import FFNLayer, dequantize, ffn_layout, load_teacher

__version__ = "0.1.0"

try:  # importing the model registers TinyONN with the transformers Auto classes
    from tinyonn.model import TinyONNConfig, TinyONNForCausalLM
except ImportError:  # an older transformers (the GPU image's 5.17): probe and clustering still work
    pass

__all__ = [
    "assemble", "Batch", "cluster", "ClusterConfig", "collate", "DataConfig", "DataFormatError", "dequantize",
    "encode_example", "encode_examples", "EncodedSample", "Example", "ExpertPlan", "ffn_layout", "FFNLayer",
    "iter_batches", "load_probe_set", "load_teacher", "per_sample_loss", "PretrainConfig", "probe",
    "ProbeConfig", "read_examples", "RoutingConfig", "score_store", "ScoreConfig", "ScoreStore",
    "TeacherModelConfig", "TeacherNotFoundError", "TinyONNConfig", "TinyONNError", "TinyONNForCausalLM",
    "UnsupportedArchitectureError",
]
