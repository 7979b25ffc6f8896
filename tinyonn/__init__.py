"""Tiny-ONN: a sparse mixture of experts built from a dense teacher's own neurons.

Pipeline (each stage a function over a run folder; `tinyonn.run_pipeline` chains them):
teacher → probe → cluster → assemble → train (SMK) → evaluate / explain.
"""

from tinyonn.clustering import ClusterConfig, ExpertPlan, cluster
from tinyonn.config import DataConfig, ProbeConfig
from tinyonn.data import (
    Batch,
    EncodedSample,
    Example,
    collate,
    encode_example,
    encode_examples,
    iter_batches,
    load_eval_set,
    load_probe_set,
    per_sample_loss,
    read_examples,
)
from tinyonn.evaluation.evaluate import EvaluateConfig, evaluate
from tinyonn.explain import ExplainConfig, explain, write_report
from tinyonn.errors import DataFormatError, TeacherNotFoundError, TinyONNError, UnsupportedArchitectureError
from tinyonn.model.assemble import assemble
from tinyonn.model.modeling import TinyONNConfig, TinyONNForCausalLM  # registers "tinyonn" with the Auto classes
from tinyonn.model.routing import RoutingConfig
from tinyonn.pipeline import EvalConfig, RunConfig, run_pipeline
from tinyonn.probe import probe
from tinyonn.release import ReleaseConfig, release
from tinyonn.store import ScoreConfig, ScoreStore, score_store
from tinyonn.teacher import FFNLayer, dequantize, ffn_layout, load_teacher

__version__ = "0.1.0"

__all__ = [
    "assemble", "Batch", "cluster", "ClusterConfig", "collate", "DataConfig", "DataFormatError", "dequantize",
    "encode_example", "encode_examples", "EncodedSample", "Example", "ExpertPlan", "ffn_layout", "FFNLayer",
    "iter_batches", "load_eval_set", "load_probe_set", "load_teacher", "per_sample_loss", "probe",
    "ProbeConfig", "read_examples", "RoutingConfig", "run_pipeline", "RunConfig", "EvalConfig", "score_store", "ScoreConfig", "ScoreStore",
    "TeacherNotFoundError", "TinyONNConfig", "TinyONNError", "TinyONNForCausalLM",
    "UnsupportedArchitectureError", "ExplainConfig", "explain", "write_report", "evaluate", "EvaluateConfig",
    "release", "ReleaseConfig",
]
