"""Training the embedded default reward model (``nabla train-reward``): sample the policy on training problems,
grade the responses with the verifier, train an outcome reward model (LoRA + score head on the policy's own
backbone, with ``lightning.Trainer``), evaluate it on held-out problems, export the adapter.

- :mod:`nabla.rewardtrain.sampling`: the sampling stage (resumable JSONL) and the problem split.
- :mod:`nabla.rewardtrain.data`: grading, reward inputs, the Lightning data module.
- :mod:`nabla.rewardtrain.module`: the Lightning module (pointwise / pairwise loss) and ``train``.
- :mod:`nabla.rewardtrain.evaluation`: held-out AUC and the best-of-N lift.
- :mod:`nabla.rewardtrain.pipeline`: the ``train-reward`` command.
"""
