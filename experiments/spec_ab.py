"""Speculative decoding's loop overhead, for an A/B of two checkouts (one JSON line per run).

    for i in 1 2 3 4 5; do for tree in /tmp/old_tree .; do
      (cd $tree && PYTHONPATH=. python /path/to/experiments/spec_ab.py shared 7); done; done

A random-initialised model (L4 D128 H4 F512 T128, 65 tokens), greedy, k = 4 drafts at width 0.5,
batch 1, 116 tokens after an 8-token prompt: the median ms per token of `repeats` runs
(argv[2]) with the draft cache argv[1]. results/engine/speculative_ab_cpu.json holds one A/B.
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rag_jax import activation
from rag_jax import sample as sample_lib
from rag_jax.models import gpt


def main(draft_cache: str, repeats: int) -> dict:
  cfg = gpt.GPTConfig(vocab_size=65, num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512,
                      block_size=128)
  model = gpt.GPT(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 128), jnp.int32))['params']
  act = activation.default_config()
  act.update(enabled=True, lam=0.75, buckets=4)
  prompt, n = jnp.arange(1, 9)[None], 116
  args = (params, prompt, jax.random.key(0), jnp.asarray([8]), jnp.asarray([0]))
  compiled = sample_lib.speculative_generate.lower(
      params, model, *args[1:], num_tokens=n, temperature=1.0, top_k=0, top_p=1.0, greedy=True,
      end_token=None, act=ml_collections.FrozenConfigDict(act), draft_fraction=0.5,
      draft_tokens=4, draft_cache=draft_cache).compile()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return {'ms_per_token': 1000 * float(np.median(times)) / n,
          'stats': np.asarray(out[1]).tolist()}


if __name__ == '__main__':
  print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
