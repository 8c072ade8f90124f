"""What e_K's width costs a knowledge prior: the retrieval probe of a run's MiniLM embeddings, whole and cut
to fewer dimensions (a random Gaussian projection, PCA, PCA whitened).

    python benchmarks/prior_width.py --workdir RUN --set data.raw_dir=../shared/data/amazon2014_beauty

RUN is read only and must hold the MiniLM export (RUN/export_minilm: a run with the transformer+minilm row
or `model.knowledge_prior=minilm`). Prints valid and test HR@20 / MRR@20 / cold HR@20 per feature set,
in % (docs/method.md, "A knowledge prior").
"""

import argparse

import numpy as np

from common import ROOT, apply_overrides
from probe_exports import probe_line
from train_step import load_config
from tpad_jax import export, layout, rows
from tpad_jax.data import readonly


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tpad_base.py"))
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--dims", default="64,128", help="the widths to cut to")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="the run's config overrides")
    args = parser.parse_args()
    data = readonly.load(apply_overrides(load_config(args.config, None), args.set), args.workdir)
    minilm = export.load_export(layout.export_dir(args.workdir, rows.MINILM))[0]
    centred = minilm - minilm.mean(axis=0)
    _, scale, axes = np.linalg.svd(centred, full_matrices=False)
    features = {f"MiniLM ({minilm.shape[1]})": minilm}
    for dim in (int(d) for d in args.dims.split(",")):
        projection = np.random.default_rng(0).normal(size=(minilm.shape[1], dim))
        features[f"random projection ({dim})"] = minilm @ projection
        features[f"PCA ({dim})"] = centred @ axes[:dim].T
        features[f"PCA whitened ({dim})"] = centred @ axes[:dim].T / scale[:dim]
    print("| features | valid HR@20 / MRR@20 / cold HR@20 | test HR@20 / MRR@20 / cold HR@20 |")
    print("|---|---|---|")
    for name, values in features.items():
        print(f"| {name} | {probe_line(values, data, 'valid')} | {probe_line(values, data, 'test')} |",
              flush=True)


if __name__ == "__main__":
    main()
