"""The resumable contrastive training loop: mine, train, extract, validate, checkpoint."""

import dataclasses
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging as absl_logging

from tfmet.data import descriptor_store as store_lib
from tfmet.data import pairs as pairs_lib
from tfmet.data.images import read_image
from tfmet.descriptors import spec as spec_lib
from tfmet.descriptors.embedder import DescriptorExtractor
from tfmet.io.atomic import atomic_path, save_json
from tfmet.training import distribute, rundir
from tfmet.training.contrastive import mining
from tfmet.training.contrastive.augment import Augmenter
from tfmet.training.contrastive.config import (
    augment_config,
    check_config,
)
from tfmet.training.contrastive.data import (
    _PooledExtractor,
    init_projector_from_pca,
    knn_validation,
    load_met_training_data,
    pooled_dim,
    read_initial_descriptors,
)
from tfmet.training.contrastive.optimizer import step_decay
from tfmet.training.contrastive.trainer import ContrastiveTrainer, build_embedder
from tfmet.training.contrastive.workdir import (
    BACKBONE_WEIGHTS_FILE,
    CHECKPOINT_DIR,
    DESCRIPTOR_DIR,
    HISTORY_FILE,
    MODEL_DIR,
    MODEL_FILE,
    TENSORBOARD_DIR,
    TrainResult,
    _descriptor_dir,
    _extract,
    _prepare_workdir,
    _read_history,
    _RunState,
)


def train(config, info_dir, image_root, workdir, init_descr=None, resume=False):
    """Runs (or resumes) contrastive training on the Met database; see the module docstring.

    Every epoch: mine the pairs from the previous epoch's database descriptors (the initial ones
    for epoch 1), train on them, extract single-scale database and validation descriptors,
    evaluate the K=1, tau=1 kNN (GAP / GAP- / ACC), write TensorBoard summaries and a
    checkpoint. The workdir holds:

        config.json            the run's settings (a resumed run must match them)
        checkpoints/           tf.train.CheckpointManager: model, optimizer, epoch, step
        descriptors/epoch_<e>  descriptor stores (train, val) after epoch e; epoch_0 = initial
        tensorboard/           summaries
        history.json           per-epoch numbers
        model/embedder.keras   the final Embedder (for `tfmet-extract`), and
        model/backbone.weights.h5

    Args:
      config: the training config (`configs/met_contrastive_r18.py`), a ConfigDict or dict.
      info_dir: folder with the Met ground-truth JSON files.
      image_root: folder holding `images/`.
      workdir: output folder.
      init_descr: optional initial single-scale database descriptors (see
        `read_initial_descriptors`); extracted with the initial model when None.
      resume: continue from the latest checkpoint in `workdir` (from scratch if there is none).

    `config.strategy` ("default", "mirrored", "multi_worker"; `tfmet.training.distribute`)
    splits every sub-batch of `batch_size` pairs across the replicas; the results equal the
    single-device run with the same `batch_size` up to float rounding. In a multi-worker run
    only the chief writes `workdir`; the other workers write to a temporary copy.

    Returns:
      a `TrainResult`. With `config.stop_at_step` the run stops (checkpointed) once that many
      optimizer steps are done, with `finished=False`; call again with resume=True to go on.
    """
    config = check_config(config)
    strategy = distribute.make_strategy(config["strategy"])
    workdir = os.fspath(workdir)
    with distribute.worker_workdir(workdir, strategy, resume) as writable:
        result = _train(config, info_dir, image_root, writable, init_descr, resume, strategy)
    if writable == workdir:
        return result
    # another worker of a multi-worker run: name what the chief wrote, not the deleted copy
    return dataclasses.replace(
        result,
        workdir=workdir,
        model_path=result.model_path and os.path.join(workdir, MODEL_DIR, MODEL_FILE),
        backbone_weights_path=result.backbone_weights_path
        and os.path.join(workdir, MODEL_DIR, BACKBONE_WEIGHTS_FILE),
    )


def _train(config, info_dir, image_root, workdir, init_descr, resume, strategy):
    workdir = os.fspath(workdir)
    data = load_met_training_data(info_dir, image_root, bool(config["mini"]))
    record = dict(config, init_descr=None if init_descr is None else os.path.abspath(init_descr))
    # Every input is checked before the first write: a refused start leaves no run behind that
    # would block its own retry.
    with strategy.scope():
        embedder = build_embedder(config)
    initial = None
    if init_descr is not None:
        initial = read_initial_descriptors(init_descr, len(data.train_files), pooled_dim(embedder))
    _prepare_workdir(workdir, record, resume)

    with strategy.scope():
        trainer = ContrastiveTrainer(
            embedder,
            learning_rate=float(config["learning_rate"]),
            weight_decay=float(config["weight_decay"]),
            margin=float(config["margin"]),
            loss_scaling=config.get("precision") == "float16",
            strategy=strategy,
        )
    state = _RunState(
        trainer, os.path.join(workdir, CHECKPOINT_DIR), int(config["keep_checkpoints"])
    )
    restored = state.restore() if resume else None
    if resume and restored is None:
        absl_logging.info("%s: no checkpoint to resume from; starting from scratch", workdir)
    elif restored:
        absl_logging.info(
            "Resumed %s: epoch %d done, step %d of the next, global step %d",
            restored,
            int(state.epoch.numpy()),
            int(state.step_in_epoch.numpy()),
            state.global_step,
        )
    history = _read_history(workdir) if restored else []
    writer = tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR))
    loop = _TrainingLoop(config, data, workdir, initial, trainer, state, writer, history)
    try:
        return loop.run(fresh=restored is None)
    finally:
        writer.close()


class _TrainingLoop:
    """The epochs of one `train` call (state lives in `_RunState` and the workdir)."""

    def __init__(self, config, data, workdir, initial, trainer, state, writer, history):
        self.config = config
        self.data = data
        self.workdir = workdir
        self.initial = initial  # (descriptors, valid) given with `init_descr`, else None
        self.trainer = trainer
        self.state = state
        self.writer = writer
        self.history = history
        self.embedder = trainer.embedder
        self.extractor = DescriptorExtractor(self.embedder, scales=(1.0,))
        self.augmenter = Augmenter(augment_config(config))
        backend = config["mining"]["backend"]
        self.search = lambda database, queries, k: mining.knn_search(database, queries, k, backend)

    # -- helpers -------------------------------------------------------------------------------

    def _extract(self, extractor, name, dim, split, output_dir):
        d = self.data
        files, paths, labels, source = (
            (d.train_files, d.train_paths, d.train_labels, d.train_source)
            if split == "train"
            else (d.val_files, d.val_paths, d.val_labels, d.val_source)
        )
        return _extract(
            extractor, name, dim, split, files, paths, labels, source, output_dir, self.config
        )

    def _model_name(self):
        return f"contrastive:{self.config['backbone']}:step={self.state.global_step}"

    def _validate(self, output_dir):
        """Extracts database + val descriptors with the current model and evaluates the kNN."""
        dim = self.embedder.output_dim
        train_store = self._extract(self.extractor, self._model_name(), dim, "train", output_dir)
        val_store = self._extract(self.extractor, self._model_name(), dim, "val", output_dir)
        valid = train_store.valid
        scores = knn_validation(
            train_store.descriptors[valid],
            self.data.train_labels[valid],
            val_store.descriptors,
            self.data.val_labels,
            self.config["knn_backend"],
        )
        return scores, train_store

    def _mining_descriptors(self, epoch):
        """(descriptors, valid) of the database after `epoch` (0: the initial ones)."""
        if epoch == 0 and self.initial is not None:
            return self.initial
        directory = _descriptor_dir(self.workdir, epoch)
        if not store_lib.has_store(directory, "train"):
            raise FileNotFoundError(
                f"{directory}: the database descriptors of epoch {epoch}, needed to mine the "
                "next epoch's pairs, are missing"
            )
        store = store_lib.read_store(directory, "train", mmap=False)
        return np.asarray(store.descriptors), store.valid

    def _gem_p(self):
        return float(keras.ops.convert_to_numpy(self.embedder.pool.power))

    # -- phases --------------------------------------------------------------------------------

    def _initialise(self):
        """Initial descriptors (epoch 1's mining), PCA projector, optional initial evaluation."""
        c = self.config
        weights = c.get("weights")
        fingerprint = spec_lib.weights_fingerprint(weights, c["seed"])
        if self.initial is None:
            absl_logging.info("Extracting the initial single-scale database descriptors")
            self._extract(
                _PooledExtractor(self.embedder),
                f"initial:{c['net']}:{fingerprint}:p={c['gem_p']}",
                pooled_dim(self.embedder),
                "train",
                _descriptor_dir(self.workdir, 0),
            )
        if c["pca"]:
            descriptors, valid = self._mining_descriptors(0)
            init_projector_from_pca(self.embedder, descriptors[valid])
            absl_logging.info("Projector initialised from PCA-whitening of the initial descriptors")
        if c["initeval"]:
            scores, _ = self._validate(os.path.join(self.workdir, DESCRIPTOR_DIR, "initeval"))
            absl_logging.info("Initial validation: %s", _format_scores(scores))
            rundir.write_scalars(self.writer, 0, {f"val/{k}": v for k, v in scores.items()})
            self.history.append({"epoch": 0, **{f"val_{k}": v for k, v in scores.items()}})
            save_json(os.path.join(self.workdir, HISTORY_FILE), self.history)
        self.state.save()

    def _train_epoch(self, epoch):
        """Trains the remaining steps of `epoch`; True if stopped early at `stop_at_step`."""
        c, state = self.config, self.state
        lr = step_decay(c["learning_rate"], epoch, c["sched_step"], c["sched_gamma"])
        self.trainer.learning_rate = lr
        pairs = self._mine(epoch, lr)
        bsize, vbs = int(c["batch_size"]), int(c["vbsizemul"])
        sub_batches = pairs_lib.num_batches(len(pairs), bsize)
        virtual_steps = -(-sub_batches // vbs)
        done = int(state.step_in_epoch.numpy())
        if done == 0:
            state.loss_sum.assign(0.0)
            state.loss_pairs.assign(0.0)
        dataset = pairs_lib.pair_dataset(
            self.data.train_files,
            pairs,
            self.augmenter,
            bsize,
            int(c["seed"]),
            epoch,
            start=min(done * vbs * bsize, len(pairs)),
            num_parallel_calls=int(c["num_parallel_calls"]),
        )
        self.distances = {"positive": [], "negative": []}
        progress = rundir.Progress(f"epoch {epoch}", len(pairs), unit="pairs")
        batches = _NamedFailures(iter(dataset), self.data.train_files, pairs, bsize, epoch)
        batches.position = min(done * vbs * bsize, len(pairs))
        for step in range(done, virtual_steps):
            losses = self._step(batches, min(vbs, sub_batches - step * vbs))
            state.step_in_epoch.assign(step + 1)
            state.loss_sum.assign_add(float(np.sum(losses, dtype=np.float64)))
            state.loss_pairs.assign_add(float(losses.size))
            last = step + 1 == virtual_steps
            if self._after_step(losses, lr, last):
                return True
            progress.update(
                min((step + 1) * vbs * bsize, len(pairs)), f"loss {float(np.mean(losses)):.4f}"
            )
        state.save()  # the epoch's steps are done; validation may take long
        return False

    def _mine(self, epoch, lr):
        """The epoch's pairs, mined from the previous epoch's descriptors, in training order."""
        c = self.config
        descriptors, valid = self._mining_descriptors(epoch - 1)
        rng = np.random.default_rng([int(c["seed"]), epoch])
        started = time.perf_counter()
        pairs = mining.make_pairs(
            c["pairs_type"],
            self.data.train_labels,
            rng,
            descriptors=descriptors if mining.needs_descriptors(c["pairs_type"]) else None,
            valid=valid,
            top_k=int(c["mining"]["top_k"]),
            pool=int(c["mining"]["pool"]),
            search=self.search,
        ).shuffled(rng)
        stats = pairs.statistics()
        stats["unreadable_images"] = int(np.sum(~valid))
        negatives = pairs.kind == mining.NEGATIVE
        if negatives.any():
            stats["negative_similarity"] = _mean_pair_similarity(
                descriptors, pairs.first[negatives], pairs.second[negatives]
            )
        seconds = time.perf_counter() - started
        absl_logging.info("Epoch %d: lr %.3g, %s (mined in %.1f s)", epoch, lr, stats, seconds)
        self.pair_stats = stats
        return pairs

    def _step(self, batches, count):
        """One optimizer step over `count` accumulated sub-batches; returns the pair losses."""
        losses = []
        for _ in range(count):
            batch = next(batches)
            loss, squared = self.trainer.accumulate(batch["first"], batch["second"], batch["label"])
            losses.append(loss.numpy())
            positive = batch["label"].numpy() == 1
            distances = np.sqrt(np.maximum(squared.numpy(), 0.0))
            self.distances["positive"].append(distances[positive])
            self.distances["negative"].append(distances[~positive])
        self.trainer.apply()
        return np.concatenate(losses)

    def _after_step(self, losses, lr, last):
        """Logs, checkpoints; True when `stop_at_step` is reached (state saved)."""
        c, state = self.config, self.state
        global_step = state.global_step
        if global_step % int(c["log_every_steps"]) == 0 or last:
            rundir.write_scalars(
                self.writer,
                global_step,
                {
                    "train/loss": float(np.mean(losses)),
                    "train/learning_rate": lr,
                    "train/gem_p": self._gem_p(),
                },
            )
        every = int(c["checkpoint_every_steps"])
        if every and global_step % every == 0:
            state.save()
        stop = c.get("stop_at_step")
        if stop is not None and global_step >= int(stop):
            state.save()
            absl_logging.info("Stopping at global step %d (stop_at_step)", global_step)
            return True
        return False

    def _finish_epoch(self, epoch, seconds):
        c, state = self.config, self.state
        started = time.perf_counter()
        scores, _ = self._validate(_descriptor_dir(self.workdir, epoch))
        loss = float(state.loss_sum.numpy() / max(state.loss_pairs.numpy(), 1.0))
        entry = {
            "epoch": epoch,
            "global_step": state.global_step,
            "loss": loss,
            "learning_rate": self.trainer.learning_rate,
            "gem_p": self._gem_p(),
            **{f"val_{k}": v for k, v in scores.items()},
            "pairs": self.pair_stats,
            "train_seconds": seconds,
            "validation_seconds": time.perf_counter() - started,
        }
        absl_logging.info(
            "Epoch %d: loss %.5f, val %s, GeM p %.4f",
            epoch,
            loss,
            _format_scores(scores),
            entry["gem_p"],
        )
        step = state.global_step
        with self.writer.as_default(step=step):
            tf.summary.scalar("epoch/loss", loss)
            tf.summary.scalar("epoch/gem_p", entry["gem_p"])
            for key, value in scores.items():
                tf.summary.scalar(f"val/{key}", value)
            for key, value in self.pair_stats.items():
                tf.summary.scalar(f"pairs/{key}", value)
            for key, chunks in self.distances.items():
                if chunks and np.concatenate(chunks).size:
                    values = np.concatenate(chunks)
                    tf.summary.histogram(f"pairs/{key}_distance", values)
                    if key == "negative":
                        active = float(np.mean(values < float(c["margin"])))
                        tf.summary.scalar("pairs/active_negatives", active)
            tf.summary.scalar("epoch/train_seconds", seconds)
        self.writer.flush()
        self.history.append(entry)
        save_json(os.path.join(self.workdir, HISTORY_FILE), self.history)
        state.epoch.assign(epoch)
        state.step_in_epoch.assign(0)
        state.save()
        if not c["keep_all_descriptors"] and epoch >= 2:
            shutil.rmtree(_descriptor_dir(self.workdir, epoch - 1), ignore_errors=True)

    def _finalise(self):
        model_dir = os.path.join(self.workdir, MODEL_DIR)
        os.makedirs(model_dir, exist_ok=True)
        model_path = os.path.join(model_dir, MODEL_FILE)
        weights_path = os.path.join(model_dir, BACKBONE_WEIGHTS_FILE)
        with atomic_path(model_path) as tmp:
            self.embedder.save(tmp)
        with atomic_path(weights_path) as tmp:
            self.embedder.backbone.save_weights(tmp)
        absl_logging.info(
            "Final model written to %s (backbone weights: %s)", model_path, weights_path
        )
        return self._result(True, model_path, weights_path)

    def _result(self, finished, model_path=None, weights_path=None):
        return TrainResult(
            workdir=self.workdir,
            epochs_completed=int(self.state.epoch.numpy()),
            global_step=self.state.global_step,
            finished=finished,
            history=list(self.history),
            model_path=model_path,
            backbone_weights_path=weights_path,
        )

    def run(self, fresh):
        if fresh:
            self._initialise()
        for epoch in range(int(self.state.epoch.numpy()) + 1, int(self.config["epochs"]) + 1):
            started = time.perf_counter()
            if self._train_epoch(epoch):
                return self._result(False)
            self._finish_epoch(epoch, time.perf_counter() - started)
        return self._finalise()


class _NamedFailures:
    """An epoch's batch iterator whose read failures name the image.

    Unreadable images are left out of mining, but a file can change between the extraction that
    judged it readable and the epoch that reads it (replaced, truncated, removed, or grown past a
    limit). tf.data then fails with an op error that names no file; this finds the image among
    the failing batch's pairs and raises one `ValueError` naming it (any other failure is raised
    as it is). Nothing is written for the failed step, so the last checkpoint stands and
    `--resume` goes on once the file is fixed.
    """

    def __init__(self, batches, files, pairs, batch_size, epoch):
        self.batches, self.files, self.pairs = batches, files, pairs
        self.batch_size, self.epoch = batch_size, epoch
        self.position = 0  # the first pair of the next batch, in the epoch's order

    def __next__(self):
        try:
            batch = next(self.batches)
        except tf.errors.OpError as error:
            failure = self._unreadable_image()
            if failure is None:
                raise  # not an image of this batch: the error as it is
            raise failure from error
        self.position += int(batch["label"].shape[0])
        return batch

    def _unreadable_image(self):
        end = min(self.position + self.batch_size, len(self.pairs))
        where = f"epoch {self.epoch}, pairs {self.position}-{end - 1}"
        rows = np.concatenate(
            [self.pairs.first[self.position : end], self.pairs.second[self.position : end]]
        )
        for row in dict.fromkeys(rows.tolist()):  # each image once, in the batch's order
            image, reason = read_image(str(self.files[row]))
            if image is None:
                return ValueError(
                    f"{self.files[row]}: cannot be read for training ({where}): {reason}; it "
                    "was readable when the database's descriptors were made. Fix or remove the "
                    "file and rerun with --resume (the last checkpoint is kept)"
                )
        return None


def _mean_pair_similarity(descriptors, first, second, chunk=65536):
    """Mean inner product of descriptor rows first[i], second[i], a chunk at a time."""
    total = 0.0
    for start in range(0, first.size, chunk):
        a = descriptors[first[start : start + chunk]]
        b = descriptors[second[start : start + chunk]]
        total += float(np.einsum("ij,ij->", a, b, dtype=np.float64))
    return total / max(first.size, 1)


def _format_scores(scores):
    return ", ".join(f"{key} {100.0 * value:.2f}" for key, value in scores.items())
