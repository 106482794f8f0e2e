"""The pipeline as stages that talk through files, the way hloc composes:

- `extract(model, image_paths, out)`: global (and local) descriptors -> a features folder;
- `retrieve(database, queries, k, out)`: exact nearest neighbours -> a predictions file;
- `rerank(predictions, reranker, database, queries, depth, out)`: re-ordered predictions;
- `score(predictions, positives, recall_values)`: Recall@N, AUC-PR, recall at 100% precision;
- `evaluate(model, dataset, config)`: all of them over a benchmark, into a run folder.

Each stage also runs alone from the command line (`vprkit extract`, `vprkit retrieve`,
`vprkit rerank`, `vprkit score`). A stage given an output that exists, made from the same
inputs, model and settings, reads it instead of recomputing; one made otherwise is refused.
"""

from vprkit.pipeline.config import EvalConfig
from vprkit.pipeline.evaluate import EvalResult, evaluate
from vprkit.pipeline.extract import extract
from vprkit.pipeline.features import Features, load_features
from vprkit.pipeline.predictions import Predictions, load_predictions
from vprkit.pipeline.rerank import rerank
from vprkit.pipeline.retrieve import retrieve
from vprkit.pipeline.score import dataset_positives, score

__all__ = [
    "EvalConfig",
    "EvalResult",
    "Features",
    "Predictions",
    "dataset_positives",
    "evaluate",
    "extract",
    "load_features",
    "load_predictions",
    "rerank",
    "retrieve",
    "score",
]
