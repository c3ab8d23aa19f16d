"""Character-level GPT on tiny_shakespeare.

The default is nanoGPT's published CPU recipe; `:gpu` is its GPU recipe (config/
train_shakespeare_char.py); `:large` is the CPU recipe on a 6.0M-parameter model (6 layers,
8 heads of 36, 288 dims, 1152 MLP units); `:smoke` is tiny and trains, compile included, in well
under a minute on 2 CPU cores.

    python -m rag_jax.train --config=configs/shakespeare_char.py[:smoke|:gpu|:large] --workdir=DIR
"""
import ml_collections

from rag_jax import activation
from rag_jax import configuration

VARIANTS = ('', 'smoke', 'gpu', 'large')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ''
  if arg not in VARIANTS:
    raise configuration.UnknownVariant(arg, VARIANTS)
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Start from the parameters of another model (a workdir, an export, or a GPT-2 converted by
  # rag_jax.convert) instead of random ones; '' = from scratch. Read only by a fresh run.
  config.init_from = ''
  # With init_from: first order each layer's MLP units and heads by importance (rag_jax/reorder.py),
  # so that nested widths keep the important ones (the same function).
  config.init_reorder = False

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'tiny_shakespeare'  # a TFDS name, or 'text_files' (then set `paths`).
  config.data.paths = ''                    # text_files: comma-separated files or globs.
  config.data.tokenizer = 'char'            # 'char' (built from the train split), 'byte' or 'bpe'.
  config.data.vocab_size = 0                # 'bpe': tokens in all (> 257), learnt from train.
  config.data.data_dir = ''                 # TFDS data_dir; '' = $TFDS_DATA_DIR or
                                            # ~/tensorflow_datasets.
  config.data.eval_split = 'validation'
  # Our train/validation/test splits as TFDS split expressions (e.g. 'train[:90%]').
  config.data.splits = ml_collections.ConfigDict(
      {'train': 'train', 'validation': 'validation', 'test': 'test'})

  config.model = ml_collections.ConfigDict()
  config.model.num_layers = 4     # L: residual blocks.
  config.model.num_heads = 4      # H: attention heads.
  config.model.embed_dim = 128    # D: residual width.
  config.model.mlp_dim = 512      # F: MLP hidden width (4·D).
  config.model.head_dim = 0       # K: width of a head; 0 = D / H.
  config.model.block_size = 64    # T: context length.
  config.model.dropout = 0.0
  config.model.use_bias = False   # biases in linears and LayerNorms (nanoGPT: False).
  config.model.attention = 'auto'  # cuDNN on GPU in bfloat16, 'einsum' on CPU, else 'xla'.
  config.model.gelu = 'exact'      # the MLP's GELU: 'exact' (erf) or 'tanh' (GPT-2's).
  # Per-block heads and MLP units (one entry per block), or () for num_heads / mlp_dim in every
  # block: what an export of a per-layer plan holds (rag_jax.export --plan). Dense models only.
  config.model.layer_heads = ()
  config.model.layer_mlp_dims = ()

  config.opt = ml_collections.ConfigDict()
  config.opt.learning_rate = 1e-3
  config.opt.min_learning_rate = 1e-4  # cosine decay ends here at `num_steps`.
  config.opt.warmup_steps = 100
  config.opt.b1 = 0.9
  config.opt.b2 = 0.99
  config.opt.weight_decay = 0.1        # on matrices and embeddings only.
  config.opt.grad_clip = 1.0           # global norm; 0 disables.

  config.batch_size = 12
  config.num_steps = 2000
  config.log_every = 25
  config.eval_every = 250
  config.eval_batch_size = 128   # windows per eval batch.
  config.eval_batches = -1       # -1: the whole eval split.
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  # A jax.profiler trace of steps 'FIRST,LAST' (e.g. '20,22') into <workdir>/plugins/profile,
  # shown by TensorBoard's profile tab; '' = none.
  config.profile_steps = ''
  # Weights & Biases: off while `project` is ''. mode: 'online', 'offline' (`wandb sync` later)
  # or 'disabled'. name: '' = the workdir's name. Needs `pip install -e '.[wandb]'`.
  config.wandb = ml_collections.ConfigDict(
      {'project': '', 'entity': '', 'name': '', 'mode': 'online'})

  # Random activation (docs/design.md §1); off here: this is the dense baseline.
  config.activation = activation.default_config()

  # Activations and matmuls: 'float32' or 'bfloat16' (parameters, softmax and loss stay float32).
  config.dtype = 'float32'

  # Device mesh (data, fsdp, tensor); -1 = the devices the other axes leave. A batch is split
  # over data x fsdp; parameters and optimizer state by their logical axes (rag_jax/sharding.py
  # PARAM_AXES) through `rules`: logical name -> mesh axes ('' = kept whole).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1          # devices on the `data` axis; -1 = all.
  config.mesh.fsdp = 1           # devices splitting parameters and optimizer state (ZeRO-3).
  config.mesh.tensor = 1         # devices splitting heads, MLP units and vocabulary.
  # CPU-only hosts (train and evaluate): JAX CPU devices; 0 = one per core, as many as divide
  # the batches (data parallelism over the cores: 1.5x faster steps on 2 cores), 1 = XLA's one.
  config.mesh.cpu_devices = 0
  config.mesh.rules = ml_collections.ConfigDict(
      {'embed': 'fsdp', 'heads': 'tensor', 'mlp': 'tensor', 'vocab': 'tensor'})

  if arg == 'gpu':
    config.model.num_layers = 6
    config.model.num_heads = 6
    config.model.embed_dim = 384
    config.model.mlp_dim = 1536
    config.model.block_size = 256
    config.model.dropout = 0.2
    config.batch_size = 64
    config.num_steps = 5000
  elif arg == 'large':  # the CPU recipe on a 6.0M-parameter model (the frontier's second size)
    config.model.num_layers = 6
    config.model.num_heads = 8
    config.model.embed_dim = 288
    config.model.mlp_dim = 1152
  elif arg == 'smoke':
    config.model.num_layers = 2
    config.model.num_heads = 4
    config.model.embed_dim = 32
    config.model.mlp_dim = 128
    config.model.block_size = 32
    config.batch_size = 8
    config.num_steps = 60
    config.opt.warmup_steps = 10
    config.opt.learning_rate = 3e-3
    config.log_every = 10
    config.eval_every = 30
    config.eval_batch_size = 32
    config.eval_batches = 4
    config.checkpoint_every = 30
  return config
