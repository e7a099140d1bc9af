"""Style classification: the classifier, its fine-tuning, the bottleneck cache, training,
evaluation and prediction, one module each.

    model.py       StyleClassifier (backbone -> pooling -> one head per attribute), StyleHead, loss
    config.py      default_config(): every entry of a style config with its default
    finetune.py    which backbone blocks train (stage, fraction, hub variable pattern), BatchNorm
    bottleneck.py  cached backbone features (no pickle) for head-only training
    fit.py         Keras fitting with resume, early stopping, TensorBoard
    checkpoints.py the resumable checkpoint set (weights, optimizer, state; no pickle)
    evaluate.py    top-1/3/5, confusion matrices, per-class tables
    run.py         a whole run from a config: data, split, mode, training, evaluation, export
    predict.py     predictions, nearest paintings and outliers for images

The package exports nothing (its modules need TensorFlow; `config` too, through
`tfmet.training.rundir`): names are imported from their module, e.g.
`tfmet.training.style.model.StyleClassifier`.
"""
