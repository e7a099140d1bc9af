"""Descriptor extraction on Apache Beam (optional extra `tfmet[beam]`; see docs/beam.md).

pipeline.py        launcher: plan the chunks, export the model, build and run the pipeline
transforms.py      the pipeline's steps (chunk -> rows -> bytes -> descriptors -> chunk files)
model_handler.py   RunInference model handler over the descriptor SavedModel
chunks.py          the single-machine extraction's chunk files on any Beam file system
"""
