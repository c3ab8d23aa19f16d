"""The user documentation: every relative link in README.md and docs/ resolves (to a file, and
to a heading where it names one), the README stays short, and its Python example runs."""
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')


def _slug(heading: str) -> str:
  """GitHub's anchor of a heading: links reduced to their text, lowercase, punctuation dropped,
  spaces as hyphens."""
  text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip()).lower()
  return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def _anchors(path) -> set[str]:
  text = path.read_text()
  text = re.sub(r'```.*?```', '', text, flags=re.S)
  return {_slug(m.group(1)) for m in re.finditer(r'^#+\s+(.*)$', text, re.M)}


def _documents():
  return [ROOT / 'README.md', *sorted((ROOT / 'docs').rglob('*.md'))]


def test_slugs_are_githubs():
  assert _slug('Loading a corpus (`experiments/bench_data.py`)') == \
      'loading-a-corpus-experimentsbench_datapy'
  assert _slug('Ablation over α, β, λ') == 'ablation-over-α-β-λ'
  assert _slug('Sampling ([docs/sampling.md](docs/sampling.md))') == 'sampling-docssamplingmd'


def test_every_relative_link_resolves():
  broken = []
  for doc in _documents():
    text = re.sub(r'```.*?```', '', doc.read_text(), flags=re.S)
    for url in LINK.findall(text):
      if re.match(r'^[a-z]+:', url):
        continue
      path, _, anchor = url.partition('#')
      target = (doc.parent / path).resolve() if path else doc
      where = f'{doc.relative_to(ROOT)}: {url}'
      if not target.exists():
        broken.append(f'{where} (no such file)')
      elif anchor and target.suffix == '.md' and anchor not in _anchors(target):
        broken.append(f'{where} (no such heading)')
  assert not broken, broken


def test_readme_fits_on_a_few_screens():
  lines = (ROOT / 'README.md').read_text().splitlines()
  assert len(lines) <= 250, len(lines)
  first_screen = '\n'.join(lines[:50])
  assert 'dense trained alone' in first_screen  # the headline table comes first


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, tfds_env):
  text = (ROOT / 'README.md').read_text()
  code = re.search(r'```python\n(.*?)```', text, re.S).group(1)
  os.symlink(ROOT / 'configs', tmp_path / 'configs')
  proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                        text=True, timeout=600,
                        env={**tfds_env, 'PYTHONPATH': str(ROOT)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = [l for l in proc.stdout.splitlines() if l.startswith(('1.0 ROMEO:', '0.5 ROMEO:'))]
  assert len(printed) == 2, proc.stdout[-2000:]
  assert (tmp_path / 'runs' / 'ra_smoke' / 'config.json').exists()
