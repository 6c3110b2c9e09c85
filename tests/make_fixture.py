#!/usr/bin/env python3
"""Cut a compact parity fixture from the official-JAX reference outputs.

Usage (from the repository root):

    python tests/make_fixture.py [--parity-dir ../shared/parity] [--out tests/fixtures/parity.npz]

The reference files (``<parity-dir>/<config>.npz``, see the README there) hold the outputs of
the official D3PM JAX code (google-research ``d3pm/images/diffusion_categorical.py``) on fixed
inputs. They are ~30 MB in total; this script keeps what ``tests/test_parity.py`` needs and
writes one deterministic ``.npz`` (deflate-compressed, fixed zip timestamps) of < 2 MB.

All times in the fixture are the official 0-based ones (official t == paper t - 1).

What is kept, per configuration (keys are ``"<config>/<key>"``):

* K = 8 configs (uniform/absorbing, T = 10 and T = 1000): everything needed to recompute the
  per-example terms at ALL pixels (x_start, x_t, t, toy parameters, term outputs, train_*,
  the full-bound loop bpd_* with the replayed x_t per step). The per-element reference tensors
  (q_probs, posteriors, p_logits, ...) and the sampling trajectory are cut to a pixel subset
  (the toy denoiser and every per-element formula act per pixel, so a subset is exact).
  T = 10: the full matrix stacks; T = 1000: the stacks only at a few t.
* K = 256 configs: per-element tensors on a small pixel subset, matrices at a few rows,
  prior_bpd (needs x_start only). The toy logits are S x 256 (786 KB each), so the per-example
  vb/ce/train/bpd values of the *logits* configs cannot be recomputed and are not kept.
  ``gaussian_linear_K256_T10_logistic``: its toy parameters are only S-shaped, so everything
  per-example (term outputs, train_*, bpd_* loop) is kept at full pixels; its sampling noise
  (T x S x 256 floats) is cut to a pixel subset.
* ``uniform_cosine_K8_T10_bands2`` is skipped on purpose: d3pm_runner does not implement
  ``transition_bands`` (banded uniform matrices).

Lossless storage tricks: integer states as uint8 (K <= 256), times as int16, and the T = 1000
``bpd_x_t`` stack stored as ``(bpd_x_t - x_start) mod K`` (mostly zeros at small t; decode
with ``(x_start + d) % K``). Arrays that are exactly equal to the same key of an earlier config
(toy parameters, x_start, noise subsets, ... are shared between configs with the same K) are
stored once; ``configs_json["aliases"]`` maps ``"<config>/<key>"`` to the stored key.
Redundant keys are dropped after asserting equality:
``pred_x_start_logits`` (== ``model_out_logits`` / ``logistic_logits``), the logistic config's
matrices (== those of ``gaussian_linear_K256_T10``).
"""
import argparse
import io
import json
import os
import zipfile

import numpy as np

CONFIGS_K8 = [
    "uniform_cosine_K8_T10",
    "absorbing_jsd_K8_T10",
    "uniform_cosine_K8_T1000",
    "absorbing_jsd_K8_T1000",
]
CONFIGS_K256 = [
    "uniform_cosine_K256_T10",
    "absorbing_jsd_K256_T10",
    "gaussian_linear_K256_T10",
    "gaussian_linear_K256_T10_logistic",
]
SKIPPED = {"uniform_cosine_K8_T10_bands2": "transition_bands not implemented in d3pm_runner"}

# pixel-subset sizes (pixels per example, out of C*H*W = 192)
ELEM_PIX_K8 = 48
ELEM_PIX_K256 = 10
SAMPLE_PIX_K8 = 48
SAMPLE_PIX_K256 = 6
MAT_ROWS_K256 = [0, 1, 127, 128, 254, 255]
MAT_T_T1000 = [0, 1, 2, 3, 250, 499, 500, 750, 997, 998, 999]

PER_ELEM_KEYS = [  # S+[K] tensors evaluated at (x_start, x_t, t)
    "noise_q",
    "x_start_logits_in",
    "q_probs",
    "q_posterior_logits_int",
    "q_posterior_logits_from_logits",
    "p_logits",
]
PER_EXAMPLE_TERM_KEYS = [
    "vb_bpd", "kl_bpd_all_t", "decoder_nll_bpd_all_t", "ce_bpd", "hybrid_loss",
]
TRAIN_LOSS_KEYS = ["train_loss_hybrid", "train_loss_kl", "train_loss_cross_entropy_x_start"]
BPD_KEYS = ["bpd_vbterms", "bpd_prior", "bpd_total"]


def _int_states(a, K):
    a = np.asarray(a)
    assert a.min() >= 0 and a.max() < K
    return a.astype(np.uint8)


def _choose_pixels(seed, n_ex, n_pix, k, must=None):
    """Per-example sorted pixel indices [n_ex, k] (deterministic).

    ``must``: optional bool [n_ex, n_pix]; up to k//3 of those pixels are included first so the
    subset contains e.g. pixels whose state changed under q(x_t | x_0)."""
    rng = np.random.RandomState(seed)
    out = np.zeros((n_ex, k), np.int64)
    for b in range(n_ex):
        chosen = []
        if must is not None:
            cand = np.flatnonzero(must[b])
            if len(cand):
                chosen = list(rng.choice(cand, size=min(len(cand), max(1, k // 3)), replace=False))
        rest = np.setdiff1d(np.arange(n_pix), chosen)
        chosen += list(rng.choice(rest, size=k - len(chosen), replace=False))
        out[b] = np.sort(np.array(chosen))
    return out


def _gather_pix(a, idx, lead=0):
    """a: [..lead dims.., B, C, H, W, (K)] -> [..lead.., B, P, (K)] at per-example pixel idx [B, P]."""
    a = np.asarray(a)
    B = idx.shape[0]
    pre = a.shape[:lead]
    flat = a.reshape(pre + (B, -1) + a.shape[lead + 4:])
    # move batch/pixel axes first, gather, move back
    flat = np.moveaxis(flat, [lead, lead + 1], [0, 1])
    g = flat[np.arange(B)[:, None], idx]  # [B, P, ...pre..., (K)]
    return np.moveaxis(g, [0, 1], [lead, lead + 1])


def cut_config(name, d, other, elem_must):
    """Return dict of fixture arrays for one configuration (keys without prefix).

    elem_must: bool [B, n_pix], pixels to favour in the per-element subset (shared by all
    configs with the same K, so identical inputs such as noise_q dedupe to one array)."""
    meta = json.loads(str(d["meta_json"]))
    K, T = meta["K"], meta["T"]
    assert meta["transition_bands"] is None
    out = {"meta_json": np.array(json.dumps(meta, sort_keys=True))}
    B = d["x_start"].shape[0]
    n_pix = int(np.prod(d["x_start"].shape[1:]))
    logistic = meta["model_output"] == "logistic_pars"

    # ---- inputs & schedule (always full) ----
    out["x_start"] = _int_states(d["x_start"], K)
    out["x_t"] = _int_states(d["x_t"], K)
    out["t"] = d["t"].astype(np.int16)
    out["betas"] = d["betas"]
    out["hybrid_coeff"] = d["hybrid_coeff"]
    out["prior_bpd"] = d["prior_bpd"]
    out["train_t"] = d["train_t"].astype(np.int16)

    # redundant keys (checked, then dropped)
    if logistic:
        assert np.array_equal(d["pred_x_start_logits"], d["logistic_logits"])
    else:
        assert np.array_equal(d["pred_x_start_logits"], d["model_out_logits"])
        out["toy_alpha"] = d["toy_alpha"]

    # ---- matrices ----
    if K == 8:
        for k in ["q_onestep_at_t", "q_mats_at_t", "q_mats_at_tm1"]:
            out[k] = d[k]
        if T <= 10:
            out["q_onestep_mats"] = d["q_onestep_mats"]
            out["q_mats"] = d["q_mats"]
            out["mat_t_idx"] = np.arange(T, dtype=np.int16)
        else:
            ti = np.array(MAT_T_T1000)
            out["q_onestep_mats"] = d["q_onestep_mats"][ti]
            out["q_mats"] = d["q_mats"][ti]
            out["mat_t_idx"] = ti.astype(np.int16)
    else:
        rows = np.array(MAT_ROWS_K256)
        if logistic:
            # identical schedule / transition / K as gaussian_linear_K256_T10 (same t too)
            assert other is not None
            for k in ["q_onestep_at_t", "q_mats_at_t", "q_mats_at_tm1"]:
                assert np.array_equal(d[k], other[k]), k
            assert np.array_equal(d["t"], other["t"]) and np.array_equal(d["betas"], other["betas"])
        else:
            for k in ["q_onestep_at_t", "q_mats_at_t", "q_mats_at_tm1"]:
                out[k + "_rows"] = d[k][:, rows, :]
            out["mat_rows"] = rows.astype(np.int16)

    # ---- per-element tensors on a pixel subset ----
    elem_p = ELEM_PIX_K8 if K == 8 else ELEM_PIX_K256
    pidx = _choose_pixels(1000 + K, B, n_pix, elem_p, must=elem_must)
    out["elem_pix_idx"] = pidx.astype(np.int16)
    keys = list(PER_ELEM_KEYS)
    if logistic:
        keys += ["logistic_logits"]
    else:
        keys += ["model_out_logits"]
    for k in keys:
        out["elem_" + k] = _gather_pix(d[k], pidx)

    # ---- toy denoiser parameters ----
    if logistic:
        for k in ["toy_base_loc", "toy_base_log_scale", "toy_t_log_scale",
                  "model_out_loc", "model_out_log_scale"]:
            out[k] = d[k]  # S-shaped, full
    elif K == 8:
        out["toy_base_logits"] = d["toy_base_logits"]  # full: needed for per-example terms
        out["toy_t_logits"] = d["toy_t_logits"]

    # ---- per-example terms / training losses / full bound: only where recomputable ----
    full_terms = K == 8 or logistic
    if full_terms:
        for k in PER_EXAMPLE_TERM_KEYS + TRAIN_LOSS_KEYS + BPD_KEYS:
            out[k] = d[k]
        out["train_x_t"] = _int_states(d["train_x_t"], K)
        bx = _int_states(d["bpd_x_t"], K)
        if T > 10:
            out["bpd_x_t_minus_x_start_modK"] = (
                (bx.astype(np.int64) - out["x_start"][None].astype(np.int64)) % K
            ).astype(np.uint8)
        else:
            out["bpd_x_t"] = bx

    # ---- sampling trajectory on a pixel subset (toy denoiser is per-pixel) ----
    if "sample_noise" in d.files:
        assert float(d["sample_final_mismatch_frac"]) == 0.0
        assert np.array_equal(d["sample_traj"][-1], d["sample_final"])
        sp = SAMPLE_PIX_K8 if K == 8 else SAMPLE_PIX_K256
        sidx = _choose_pixels(2000 + K, B, n_pix, sp)
        out["sample_pix_idx"] = sidx.astype(np.int16)
        out["sample_x_init"] = _int_states(_gather_pix(d["sample_x_init"], sidx), K)
        out["sample_noise"] = _gather_pix(d["sample_noise"], sidx, lead=1)
        out["sample_traj"] = _int_states(_gather_pix(d["sample_traj"], sidx, lead=1), K)
        # the toy parameters needed on this subset are stored in full above
    return out


class _Ref(dict):
    """dict of reference arrays with an npz-like ``files`` attribute."""

    @property
    def files(self):
        return list(self)


def write_npz_deterministic(path, arrays):
    """Like np.savez_compressed, but with fixed zip timestamps and sorted keys (byte-identical
    output on every run)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    os.replace(tmp, path)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parity-dir", default=os.path.join(here, "..", "..", "shared", "parity"))
    ap.add_argument("--out", default=os.path.join(here, "fixtures", "parity.npz"))
    args = ap.parse_args()

    configs = CONFIGS_K8 + CONFIGS_K256
    data = {}
    for name in configs:
        with np.load(os.path.join(args.parity_dir, name + ".npz")) as z:
            data[name] = _Ref({k: z[k] for k in z.files})
    # favour pixels whose state changed under q(x_t|x_0) in any config with the same K
    must = {}
    for name in configs:
        d = data[name]
        K = json.loads(str(d["meta_json"]))["K"]
        ch = (d["x_t"] != d["x_start"]).reshape(d["x_start"].shape[0], -1)
        must[K] = ch if K not in must else (must[K] | ch)

    arrays, aliases = {}, {}
    for name in configs:
        d = data[name]
        K = json.loads(str(d["meta_json"]))["K"]
        other = data["gaussian_linear_K256_T10"] if name.endswith("_logistic") else None
        cut = cut_config(name, d, other, must[K])
        for k, v in sorted(cut.items()):
            v = np.asanyarray(v)
            # exact duplicates of an array already stored (same key in an earlier config, e.g.
            # toy parameters, x_start, noise_q shared by configs with the same K) become aliases
            dup = None
            for prev in configs[: configs.index(name)]:
                pk = f"{prev}/{k}"
                pk = aliases.get(pk, pk)
                if pk in arrays:
                    a = arrays[pk]
                    if a.dtype == v.dtype and a.shape == v.shape and np.array_equal(a, v):
                        dup = pk
                        break
            if dup is not None and k != "meta_json":
                aliases[f"{name}/{k}"] = dup
            else:
                arrays[f"{name}/{k}"] = v
    arrays["configs_json"] = np.array(json.dumps(
        {"configs": configs, "skipped": SKIPPED, "aliases": aliases}, sort_keys=True))
    write_npz_deterministic(args.out, arrays)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {size / 1e6:.3f} MB, {len(arrays)} arrays")
    assert size <= 2_000_000, "fixture exceeds the 2 MB budget"


if __name__ == "__main__":
    main()
