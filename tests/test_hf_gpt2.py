"""GPT-2 in and out: rag_jax.convert against `transformers` (logits, greedy text, tokenizer),
the GPT-2 layout of an export loaded by GPT2LMHeadModel, byte-level BPE, `config.init_from`,
and one clear message for each bad input. `transformers` and torch are test dependencies only
(the `dev` extra); a small GPT-2 is created here (none can be downloaded on these machines)."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax import convert
from rag_jax import errors
from rag_jax import export
from rag_jax import hf_gpt2
from rag_jax import runs
from rag_jax import sample
from rag_jax import train
from rag_jax.data import tokenizers
from tests.conftest import ROOT, SHAKESPEARE_TXT, load_config, snapshot

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')

TEXT = ('First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n'
        "  Caf\u00e9 na\u00efve \u2014 r\u00e9sum\u00e9s cost $1,234.50 (or 3'000\u20ac)! "
        'Tabs\tand   spaces, CAPS, x2y3, <|endoftext|> \U0001F600 \u4e2d\u6587\n')


def corpus() -> str:
  return SHAKESPEARE_TXT.read_text()[:200_000] if SHAKESPEARE_TXT.exists() else TEXT * 200


@pytest.fixture(scope='module')
def gpt2_dir(tmp_path_factory):
  """A small random GPT-2 saved by transformers, with a byte-level BPE vocabulary of 300
  (trained here, '<|endoftext|>' its last token) saved as GPT-2's vocab.json + merges.txt."""
  import tokenizers as hf_tokenizers
  directory = str(tmp_path_factory.mktemp('gpt2'))
  bpe = hf_tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator([corpus()], vocab_size=300, special_tokens=['<|endoftext|>'],
                          show_progress=False)
  bpe.save_model(directory)
  vocab = len(json.load(open(os.path.join(directory, 'vocab.json'))))
  config = transformers.GPT2Config(vocab_size=vocab, n_positions=48, n_embd=32, n_layer=2,
                                   n_head=4, n_inner=80, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(config)
  with torch.no_grad():  # non-zero biases and LayerNorms, so that every mapping is exercised
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'ln_' in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory)
  return directory


def hf_logits(directory, tokens):
  model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


@pytest.mark.slow
def test_gpt2_tokenizer_from_files_equals_transformers(gpt2_dir):
  ours = tokenizers.BPETokenizer.from_files(os.path.join(gpt2_dir, 'vocab.json'),
                                            os.path.join(gpt2_dir, 'merges.txt'))
  slow = transformers.GPT2Tokenizer(os.path.join(gpt2_dir, 'vocab.json'),
                                    os.path.join(gpt2_dir, 'merges.txt'))
  for text in (TEXT, TEXT * 3, ' leading space', 'trailing \n\n', '\n\n\nA'):
    ids = ours.encode(text)
    assert ids.tolist() == slow.encode(text), text
    assert ours.decode(ids) == text
  assert ours.unknown(TEXT) == [] and ours.vocab_size == len(slow)
  tokenizers.save(ours, os.path.join(gpt2_dir, 'tok.json'))
  again = tokenizers.load(os.path.join(gpt2_dir, 'tok.json'))
  os.remove(os.path.join(gpt2_dir, 'tok.json'))
  assert again.encode(TEXT).tolist() == ours.encode(TEXT).tolist()


def test_trained_bpe_round_trips_and_follows_its_corpus():
  text = corpus()
  a, b = tokenizers.build('bpe', text, 400), tokenizers.build('bpe', text, 400)
  assert a.to_json() == b.to_json() and a.vocab_size == 400  # the same corpus, the same BPE
  other = tokenizers.build('bpe', text.upper(), 400)
  assert other.to_json() != a.to_json()  # another corpus, another BPE
  for tok in (a, other):
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT  # bytes it never saw in training included
    assert ids.dtype == np.uint16
  assert len(a.encode(text)) < 0.6 * len(text.encode('utf-8'))  # merges compress the corpus


@pytest.mark.slow
def test_convert_matches_transformers(gpt2_dir, tmp_path):
  out = str(tmp_path / 'converted')
  record = convert.convert(gpt2_dir, out, load_config('shakespeare_char'))
  run = runs.load_run(out)
  assert run.model.cfg.gelu == 'tanh' and run.model.cfg.use_bias
  assert run.config.data.tokenizer == 'bpe'
  assert record['parameters'] == sum(x.size for x in jax.tree.leaves(run.params))
  tokens = np.random.default_rng(0).integers(0, run.tokenizer.vocab_size, (2, 48))
  ours, _ = run.model.apply({'params': run.params}, jnp.asarray(tokens, jnp.int32))
  np.testing.assert_allclose(np.asarray(ours), hf_logits(gpt2_dir, tokens), atol=1e-4, rtol=0)
  # Greedy text, token for token, against transformers' generate.
  prompt = 'ROMEO:\nWhat'
  got = sample.sample(run.params, run.config, prompt, tokenizer=run.tokenizer, num_tokens=20,
                      greedy=True)
  model = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
  ids = torch.tensor([run.tokenizer.encode(prompt).tolist()])
  with torch.no_grad():
    want = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)[0].numpy()
  assert got.tokens[0, :got.lengths[0]].tolist() == want.tolist()
  assert got.text[0] == run.tokenizer.decode(want)
  # Converting the same checkpoint again into the same directory is fine.
  convert.convert(gpt2_dir, out, load_config('shakespeare_char'))


@pytest.mark.slow
def test_bad_conversions_say_what_is_wrong(gpt2_dir, tmp_path):
  def broken(name, edit):
    d = tmp_path / name
    shutil.copytree(gpt2_dir, d)
    edit(d)
    return str(d)

  def set_config(**kv):
    def edit(d):
      c = json.loads((d / 'config.json').read_text())
      c.update(kv)
      (d / 'config.json').write_text(json.dumps(c))
    return edit

  cases = [
      (broken('llama', set_config(model_type='llama')), "model_type 'llama' is not a GPT-2"),
      (broken('relu', set_config(activation_function='relu')), "activation_function 'relu'"),
      (broken('noweights', lambda d: (d / 'model.safetensors').rename(d / 'pytorch_model.bin')),
       r'model.safetensors does not exist \(it holds pytorch_model.bin.*never read'),
      (broken('nomerges', lambda d: (d / 'merges.txt').unlink()), r'merges.txt missing'),
      (broken('shape', set_config(n_inner=96)), r'c_fc.weight has shape \(32, 80\), but '
       r'config.json implies \(32, 96\)'),
      (broken('layers', set_config(n_layer=1)), r'holds tensors a GPT-2 of 1 layers has not'),
      (broken('vocab', set_config(vocab_size=1000)),
       'the tokenizer has .* tokens but the model 1000'),
      (str(tmp_path / 'nothing'), 'config.json does not exist'),
  ]
  for hf_dir, message in cases:
    out = tmp_path / ('out_' + os.path.basename(hf_dir))
    with pytest.raises(errors.WorkdirError, match=message):
      convert.convert(hf_dir, str(out), load_config('shakespeare_char'))
    assert not out.exists()
  # An --out that holds something else is left as it is.
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'notes.txt').write_text('mine')
  with pytest.raises(errors.WorkdirError, match='holds other files'):
    convert.convert(gpt2_dir, str(other), load_config('shakespeare_char'))
  assert snapshot(other) == {'notes.txt': b'mine'}
  # The command line: one line.
  proc = subprocess.run([sys.executable, '-m', 'rag_jax.convert', f'--hf_dir={cases[0][0]}',
                         f'--out={tmp_path / "cli"}'], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
      "error: ") and "model_type 'llama'" in proc.stderr


@pytest.fixture(scope='module')
def converted(gpt2_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('converted') / 'gpt2')
  convert.convert(gpt2_dir, out, load_config('shakespeare_char'))
  return out


@pytest.mark.slow
def test_init_from_fine_tunes_the_converted_model(converted, gpt2_dir, tmp_path, tfds_dir):
  """A fresh run starts from the converted parameters (context cropped to 32 of 48 positions):
  with a zero learning rate its checkpoint holds them unchanged; with random activation on, it
  trains. Model fields that differ are named with the flags that set them."""
  config = load_config('shakespeare_char', 'smoke')
  config.data.update(data_dir=tfds_dir, tokenizer='bpe')
  config.model.update(num_layers=2, num_heads=4, embed_dim=32, mlp_dim=80, block_size=32,
                      use_bias=True, gelu='tanh')
  config.update(init_from=converted, num_steps=2, checkpoint_every=2, eval_every=2, log_every=1)
  config.opt.update(learning_rate=0.0, min_learning_rate=0.0, warmup_steps=0, weight_decay=0.0)
  workdir = str(tmp_path / 'lr0')
  train.train_and_evaluate(config, workdir)
  got, source = runs.load_run(workdir), runs.load_run(converted)
  assert got.tokenizer.to_json() == source.tokenizer.to_json()
  want = dict(source.params, wpe=source.params['wpe'][:32])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               got.params, want)

  bad = load_config('shakespeare_char', 'smoke')
  bad.data.update(data_dir=tfds_dir, tokenizer='bpe')
  bad.init_from = converted
  with pytest.raises(errors.WorkdirError,
                     match=r'mlp_dim 128 here, 80 there; .*--config.model.mlp_dim=80 .*'
                     r'--config.model.use_bias=True .*--config.model.gelu=tanh'):
    train.train_and_evaluate(bad, str(tmp_path / 'bad'))
  config.data.tokenizer = 'char'
  with pytest.raises(errors.WorkdirError, match=r'reads bpe tokens .* --config.data.tokenizer=bpe'):
    train.train_and_evaluate(config, str(tmp_path / 'bad2'))
  assert not os.path.exists(tmp_path / 'bad' / 'checkpoints')


@pytest.fixture(scope='module')
def bpe_mlp_run(tmp_path_factory, tfds_dir):
  """A smoke RA run on a byte-level BPE learnt from tiny_shakespeare, random activation over
  MLP units and blocks only (so its sub-models keep every head)."""
  config = load_config('ra_shakespeare_char', 'smoke')
  config.data.update(data_dir=tfds_dir, tokenizer='bpe', vocab_size=320)
  config.activation.update(sites='mlp,layers', buckets=4)
  config.update(num_steps=4, checkpoint_every=4, eval_every=4, log_every=4)
  config.opt.warmup_steps = 1
  workdir = str(tmp_path_factory.mktemp('bpe_run'))
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
def test_export_in_gpt2_layout_loads_in_transformers(bpe_mlp_run, tmp_path):
  """At a = 1 and at an MLP-and-blocks fraction the export's hf/ directory is a GPT-2 that
  GPT2LMHeadModel loads and that computes the export's logits; its tokenizer files give
  GPT2Tokenizer the run's ids. A head fraction is not representable and says so."""
  for fraction in (1.0, 0.5):
    out = str(tmp_path / f'a{fraction}')
    record = export.export(bpe_mlp_run, fraction, out)
    assert record['huggingface']['written'] and record['huggingface']['tokenizer'], record
    sub = runs.load_run(out)
    tokens = np.random.default_rng(1).integers(0, sub.tokenizer.vocab_size, (2, 32))
    ours, _ = sub.model.apply({'params': sub.params}, jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(np.asarray(ours), hf_logits(os.path.join(out, 'hf'), tokens),
                               atol=1e-4, rtol=0)
    slow = transformers.GPT2Tokenizer.from_pretrained(os.path.join(out, 'hf'))
    assert slow.encode(TEXT) == sub.tokenizer.encode(TEXT).tolist()
  assert record['model']['mlp_dim'] < 128 and record['model']['num_layers'] == 1
  q = export.export(bpe_mlp_run, 0.5, str(tmp_path / 'int8'), int8=True)
  assert not q['huggingface']['written'] and 'int8' in q['huggingface']['why']
  with pytest.raises(hf_gpt2.NotRepresentable, match='do not fill the width'):
    r = runs.load_run(bpe_mlp_run)
    cfg = r.model.cfg.__class__(**{**r.model.cfg.__dict__, 'num_heads': 2, 'head_dim': 8})
    hf_gpt2.to_hf(r.params, cfg)


@pytest.mark.slow
def test_convert_runs_in_float32_unless_the_config_says_otherwise(gpt2_dir, tmp_path):
  """The command line takes `--config.*` overrides as train does; GPT-2's config is bfloat16
  for training, but a conversion runs in float32 (transformers' logits within 1e-4) unless
  `--config.dtype` is given, and says which."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  for extra, dtype in (([], 'float32'), (['--config.dtype=bfloat16'], 'bfloat16')):
    out = tmp_path / dtype
    proc = subprocess.run([sys.executable, '-m', 'rag_jax.convert', f'--hf_dir={gpt2_dir}',
                           f'--out={out}', *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(f'running in {dtype}')
    assert runs.load_run(str(out)).config.dtype == dtype
