"""evaluate's printed table (rag_jax/evaluate.py format_table), on hand-made entries."""
from rag_jax import evaluate


def entry(fraction, loss, flops, relative, policy='fixed', **extra):
  return {'active_fraction': fraction, 'policy': policy, 'loss': loss,
          'bits_per_token': loss / 0.6931471805599453, 'flops_per_token': flops,
          'relative_flops': relative, 'split': 'validation', 'step': 100, 'tokens': 4096,
          **extra}


def test_the_table_aligns_costs_and_the_loss_against_the_full_width():
  full = entry(1.0, 2.0, 1.0e6, 1.0)
  half = entry(0.5, 2.1, 0.6e6, 0.6)
  lines = evaluate.format_table([half]).splitlines()  # no a = 1 scored: no comparison
  assert lines[0] == 'validation split, step 100, 4,096 tokens scored'
  assert lines[2].split() == ['fixed', '0.50', '0.600M', '0.60', '2.1000', '3.0297']
  lines = evaluate.format_table([half], [full]).splitlines()  # a = 1 from the saved curve
  assert lines[2].split()[-1] == '+5.00%' and len({len(l) for l in lines[1:]}) == 1
  adaptive = entry(0.5, 2.05, 1.1e6, 1.1, policy='adaptive', draft_fraction=0.5,
                   threshold=0.7, escalated=0.5)
  row = evaluate.format_table([full, adaptive]).splitlines()[3]
  assert row.startswith('adaptive 0.5 @ 0.7 (up 50%)') and row.split()[-1] == '+2.50%'
