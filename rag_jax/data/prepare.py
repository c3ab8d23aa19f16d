"""Prepares a dataset ahead of training (what `make data` runs).

    python -m rag_jax.data.prepare [--dataset=tiny_shakespeare] [--manual_file=FILE] \
        [--data_dir=DIR]

With `--manual_file` present, it is copied to <data_dir>/downloads/manual/input.txt, where the
stock TFDS builder reads it offline (sha256 checked). tiny_shakespeare ships inside the package
(`data.pipeline.BUNDLED_CORPORA`) and is placed there by itself; other datasets are downloaded by TFDS.
"""
from absl import app, flags
import ml_collections

from rag_jax.data import pipeline as data



def _define_flags():  # at run time only: importing the module defines no flags
  flags.DEFINE_string('dataset', 'tiny_shakespeare', 'TFDS dataset name.')
  flags.DEFINE_string('manual_file', '', 'Offline copy of the corpus, if any.')
  flags.DEFINE_string('data_dir', '', "TFDS data_dir ('' = $TFDS_DATA_DIR or "
                      '~/tensorflow_datasets).')


def main(argv):
  del argv
  f = flags.FLAGS
  config = ml_collections.ConfigDict({'data': {'dataset': f.dataset, 'paths': '',
                                               'data_dir': f.data_dir}})
  placed = data.place_manual_file(f.manual_file, data.data_dir(config))
  if placed:
    print(f'offline copy placed at {placed}')
  try:
    builder = data.prepare(config)
  except data.DataError as e:
    raise SystemExit(f'error: {e}')
  print(f'{f.dataset} ready in {builder.data_dir}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
