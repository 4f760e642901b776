"""emomerge.training.models: the model layer training and evaluation share (DESIGN.md, Layers).

- :mod:`.families`: one row per VLM family (model class, LoRA targets, template, image cap),
- :mod:`.templates`: the families' chat templates,
- :mod:`.loading`: loading a VLM + processor (precision, quantisation, device map),
- :mod:`.batching`: samples → model inputs, chat prompts and answer texts,
- :mod:`.tiny`: tiny offline VLMs of every family for tests and the demo,
- :mod:`.fingerprint`: the base model's content fingerprint.

Nothing here imports the rest of :mod:`emomerge.training` (trainer, stages, curriculum): only
:mod:`emomerge.training.data` and :mod:`emomerge.merging` (``tests/test_layers.py``). Importing
this package imports no submodule, so ``families`` does not pay for transformers.
"""
