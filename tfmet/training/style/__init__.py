"""Style classification: the classifier, its fine-tuning, the bottleneck cache, training,
evaluation and prediction, one module each.

    model.py       StyleClassifier (backbone -> pooling -> one head per attribute), StyleHead, loss
    finetune.py    which backbone blocks train (stage, fraction, hub variable pattern), BatchNorm
    bottleneck.py  cached backbone features (no pickle) for head-only training
    fit.py         Keras fitting with checkpoints, resume, early stopping, TensorBoard
    evaluate.py    top-1/3/5, confusion matrices, per-class tables
    run.py         a whole run from a config: data, split, mode, training, evaluation, export
    predict.py     predictions, nearest paintings and outliers for images

The classes of `model` are importable from the package too; they load on first use, so reading a
style config (`tfmet.training.style.config`) does not load TensorFlow.
"""

from tfmet.io.lazy import lazy_exports

_MODEL_NAMES = (
    "POOLINGS",
    "MaskedSparseCrossEntropy",
    "StyleClassifier",
    "StyleHead",
    "masked_cross_entropy",
)
__all__ = list(_MODEL_NAMES)
__getattr__ = lazy_exports(__name__, dict.fromkeys(_MODEL_NAMES, "model"))
