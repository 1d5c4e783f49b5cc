"""theory_check.py: check the paper's statements about differential attention's Jacobians numerically.

    python theory_check.py [--samples 240] [--seed 0] [--device cpu] [--json PATH]

For random inputs X (N tokens, width dim) and random layers from diffattn.py, in float64:
J1, J2, J_DA are the Jacobians of A1, A2 and A_DA = A1 - lambda A2 (all heads of the layer)
with respect to X; J_base that of a standard attention map. theta is the angle between J1 and
J2 (Frobenius inner product), rho = ||J2|| / ||J1||, gamma = ||J1|| / ||J_base||,
kappa = sqrt(1 + lambda^2 rho^2 - 2 lambda rho cos theta).

Each exact statement prints PASS or FAIL with its numbers; the findings (how often cos theta < 0,
kappa's distribution, the depth experiment) are reported, not judged. Exit status 1 if any
exact statement fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.func import jacrev, jvp
from tqdm import tqdm

import diffattn as da

WIDTHS_HEADS = [(16, 2), (32, 4), (48, 4)]
TOKENS = [4, 8, 12]
LAMBDA_INITS = [0.2, 0.5, 0.8, 0.9]
TOL = 1e-10  # float64 relative tolerance for identities
warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")  # raised inside torch.func


def provenance(device) -> dict:
    """Device, versions, and the commit of the two files that decide these numbers ("-dirty": edited since)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
            return None
    head = git("rev-parse", "--short", "HEAD")
    diff = git("diff", "--quiet", "HEAD", "--", "diffattn.py", "theory_check.py")
    commit = (head.stdout.strip() if head else "") or "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    dirty = "-dirty" if diff and diff.returncode == 1 else ""
    return {"device": f"{name}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "python": platform.python_version(), "git_commit": commit + dirty}


def random_layer(dim: int, heads: int, lambda_init: float, gen: torch.Generator, device) -> da.DiffAttention:
    """A DiffAttention layer with weights scaled so its maps are far from uniform."""
    layer = da.DiffAttention(dim, heads, lambda_init=lambda_init).double().to(device)
    with torch.no_grad():
        for p in layer.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (1.5 / math.sqrt(p.shape[1])))
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            getattr(layer, name).copy_(torch.randn(layer.head_dim, generator=gen, dtype=torch.float64) * 0.1)
    return layer


def std_maps(layer: da.Attention):
    def f(X):
        with da.attention_maps(layer, retain_grad=False) as maps:
            layer(X.unsqueeze(0))
        return maps[0].A[0]
    return f


def diff_maps(layer, gate: bool = False):
    """X (N, dim) -> (A1, A2, A), each (H/2, N, N), A as the layer itself combines it; ``gate``: V2's
    (A1, A2, gate, A), the maps (H, N, N) and the gate (H, N)."""
    def f(X):
        with da.attention_maps(layer, retain_grad=False) as maps:
            layer(X.unsqueeze(0))
        m = maps[0]
        return (m.A1[0], m.A2[0], m.lam[0], m.A[0]) if gate else (m.A1[0], m.A2[0], m.A[0])
    return f


def stats(J1: torch.Tensor, J2: torch.Tensor, lam: float) -> dict:
    n1, n2 = J1.norm().item(), J2.norm().item()
    cos = (J1 * J2).sum().item() / (n1 * n2)
    rho = n2 / n1
    return {"n1": n1, "n2": n2, "cos": cos, "rho": rho, "lam": lam,
            "kappa": math.sqrt(max(0.0, 1 + lam ** 2 * rho ** 2 - 2 * lam * rho * cos))}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def sample_cases(n: int, gen: torch.Generator):
    for i in range(n):
        dim, heads = WIDTHS_HEADS[i % len(WIDTHS_HEADS)]
        yield dim, heads, TOKENS[(i // len(WIDTHS_HEADS)) % len(TOKENS)], LAMBDA_INITS[i % len(LAMBDA_INITS)]


def check_layers(samples: int, seed: int, device) -> dict:
    """Lemma 1 (full and directional), Theorems 1-3, Lemma 2, and the alignment statistics."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for dim, heads, N, lam_init in tqdm(list(sample_cases(samples, gen)), desc="random layers", leave=False):
        layer = random_layer(dim, heads, lam_init, gen, device)
        base = da.Attention(dim, heads // 2).double().to(device)  # as many maps as DA has: H/2
        with torch.no_grad():
            for p in base.parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (1.5 / math.sqrt(p.shape[1])))
        X = torch.randn(N, dim, generator=gen, dtype=torch.float64).to(device)
        lam = layer.lam().item()
        J1, J2, J = (j.detach().reshape(-1, N * dim) for j in jacrev(diff_maps(layer))(X))
        Jb = jacrev(std_maps(base))(X).detach().reshape(-1, N * dim)
        s = stats(J1, J2, lam)
        nJ, nb = J.norm().item(), Jb.norm().item()
        # Lemma 1 on the full Jacobian: J is differentiated through the layer's own A, not J1 - lam J2
        lemma1 = math.sqrt(s["n1"] ** 2 + lam ** 2 * s["n2"] ** 2 - 2 * lam * s["n1"] * s["n2"] * s["cos"])
        # Lemma 1 on a directional derivative J v
        v = torch.randn(N, dim, generator=gen, dtype=torch.float64).to(device)
        _, (d1, d2, dA) = jvp(diff_maps(layer), (X,), (v,))
        sv = stats(d1.detach().reshape(1, -1), d2.detach().reshape(1, -1), lam)
        lemma1_v = math.sqrt(sv["n1"] ** 2 + lam ** 2 * sv["n2"] ** 2 - 2 * lam * sv["n1"] * sv["n2"] * sv["cos"])
        row = {"dim": dim, "heads": heads, "tokens": N, "lambda_init": lam_init, **s, "nJ": nJ,
               "lemma1_rel_err": rel(lemma1, nJ), "lemma1_dir_rel_err": rel(lemma1_v, dA.norm().item())}
        # Theorem 1: |1 - lam rho| ||J1|| <= ||J_DA|| <= (1 + lam rho) ||J1||
        lo, hi = abs(1 - lam * s["rho"]) * s["n1"], (1 + lam * s["rho"]) * s["n1"]
        row["thm1_ok"] = lo * (1 - TOL) <= nJ <= hi * (1 + TOL)
        row["amplified"] = nJ > math.sqrt(s["n1"] ** 2 + lam ** 2 * s["n2"] ** 2) if s["cos"] < 0 else None
        # Theorems 2 and 3 with (i) branch 1's own map (gamma = 1) and (ii) an independent standard layer
        for tag, n_base in (("self", s["n1"]), ("indep", nb)):
            gamma = s["n1"] / n_base
            row[f"thm2_{tag}_rel_err"] = rel(gamma * s["kappa"], nJ / n_base)
            threshold = (1 + lam ** 2 * s["rho"] ** 2 - gamma ** -2) / (2 * lam * s["rho"])
            more_sensitive = nJ > n_base
            margin = abs(nJ - n_base) / n_base
            row[f"thm3_{tag}_agree"] = (more_sensitive == (s["cos"] < threshold)) or margin < TOL
            row[f"gamma_{tag}"] = gamma
        # Lemma 2: local Lipschitz constants (first order: spectral norms of the Jacobians)
        L_da, L_b = torch.linalg.matrix_norm(J, 2).item(), torch.linalg.matrix_norm(Jb, 2).item()
        row["L_da"], row["L_base"] = L_da, L_b
        row["lemma2_rigorous_ok"] = L_da <= row["gamma_indep"] * s["kappa"] * nb * (1 + TOL)  # ||J||_2 <= ||J||_F
        row["lemma2_literal_holds"] = L_da / L_b <= row["gamma_indep"] * s["kappa"] * (1 + TOL)
        rows.append(row)
    return {"rows": rows}


def check_v2(samples: int, seed: int, device) -> dict:
    """DA V2 (our extension of Lemma 1; the paper analyses V1): A = A1 - diag(gate) A2 with a per-token
    gate. The layer's own Jacobian obeys the chain rule J_A = J1 - S J2 - A2 * J_gate (S = diag(gate));
    with the gate held fixed, Lemma 1 with lambda = 1 and J2 -> S J2 gives ||J1 - S J2||."""
    gen = torch.Generator().manual_seed(seed + 1)
    rows = []
    for dim, heads, N, _ in tqdm(list(sample_cases(samples, gen)), desc="random V2 layers", leave=False):
        layer = da.DiffAttentionV2(dim, heads).double().to(device)
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (1.5 / math.sqrt(p.shape[-1])))
        X = torch.randn(N, dim, generator=gen, dtype=torch.float64).to(device)
        J1, J2, Jg, J = (j.detach().reshape(*j.shape[:-2], N * dim) for j in jacrev(diff_maps(layer, gate=True))(X))
        A1, A2, gate, A = diff_maps(layer, gate=True)(X)
        SJ2 = gate[..., None, None] * J2                              # (H, N, N, N dim): branch 2 with the gate fixed
        chain = J1 - SJ2 - A2[..., None] * Jg[:, :, None, :]
        s = stats(J1.reshape(-1, N * dim), SJ2.reshape(-1, N * dim), 1.0)
        fixed = (J1 - SJ2).norm().item()
        rows.append({**s, "chain_rel_err": ((J - chain).norm() / J.norm()).item(),
                     "lemma1_rel_err": rel(s["n1"] * s["kappa"], fixed),
                     "gate_share": (A2[..., None] * Jg[:, :, None, :]).norm().item() / J.norm().item()})
    return {"rows": rows}


def check_extremes(device) -> dict:
    """Theorem 1's equality cases, built from real layers.

    cos theta = +1: Q2 = Q1 and K2 = K1, so A2 = A1 and ||J_DA|| = |1 - lambda| ||J1||.
    cos theta = -1: two tokens and Q2 = -Q1, K2 = K1, so A2 = 1 - A1 entrywise, J2 = -J1,
    and ||J_DA|| = (1 + lambda) ||J1||.
    """
    gen = torch.Generator().manual_seed(123)
    out = {}
    for case, N, sign in (("cos=+1", 6, 1.0), ("cos=-1", 2, -1.0)):
        layer = random_layer(32, 4, 0.8, gen, device)
        d, C = layer.head_dim, 32
        with torch.no_grad():
            W = layer.qkv.weight.view(3, 2, 2, d, C)  # (q/k/v, diff head, sub-head, d, C)
            b = layer.qkv.bias.view(3, 2, 2, d)
            W[0, :, 1], b[0, :, 1] = sign * W[0, :, 0], sign * b[0, :, 0]  # Q2 = +-Q1
            W[1, :, 1], b[1, :, 1] = W[1, :, 0], b[1, :, 0]                # K2 = K1
        X = torch.randn(N, C, generator=gen, dtype=torch.float64).to(device)
        lam = layer.lam().item()
        J1, J2, J = (j.detach().reshape(-1, N * C) for j in jacrev(diff_maps(layer))(X))
        s = stats(J1, J2, lam)
        bound = (abs(1 - lam * s["rho"]) if sign > 0 else 1 + lam * s["rho"]) * s["n1"]
        out[case] = {"cos": s["cos"], "rho": s["rho"], "lam": lam, "norm_J_DA": J.norm().item(), "bound": bound,
                     "rel_err": rel(J.norm().item(), bound)}
    return out


def check_finite_differences(device, seed: int) -> dict:
    """Lemma 2's first-order regime: ||A(X + t u) - A(X)|| / t -> ||J u|| as t -> 0."""
    gen = torch.Generator().manual_seed(seed + 7)
    layer = random_layer(32, 4, 0.8, gen, device)
    X = torch.randn(8, 32, generator=gen, dtype=torch.float64).to(device)
    u = torch.randn(8, 32, generator=gen, dtype=torch.float64).to(device)
    u /= u.norm()
    f = lambda Z: diff_maps(layer)(Z)[2]
    _, Ju = jvp(f, (X,), (u,))
    target = Ju.norm().item()
    A0 = f(X).detach()
    ts = [10.0 ** e for e in range(-7, 2)]
    errs = [rel((f(X + t * u).detach() - A0).norm().item() / t, target) for t in ts]
    # first order: the error shrinks ~linearly with t until rounding takes over
    slope = math.log10(errs[3] / errs[1]) / math.log10(ts[3] / ts[1])  # between t = 1e-6 and 1e-4
    return {"t": ts, "rel_err": errs, "slope_1e-6_to_1e-4": slope, "target_norm_Ju": target}


def depth_experiment(seed: int, device, depths=range(1, 13), trials: int = 4, dim: int = 32, heads: int = 4,
                     N: int = 8, eps=(1e-3, 1.0)) -> dict:
    """||f_D(X + xi) - f_D(X)|| / ||xi|| for stacks of D random pre-norm blocks, DA vs standard."""
    gen = torch.Generator().manual_seed(seed + 11)
    D = max(depths)
    out = {str(e): {"std": [[] for _ in depths], "diff": [[] for _ in depths]} for e in eps}
    for _ in range(trials):
        X = torch.randn(1, N, dim, generator=gen, dtype=torch.float64).to(device)
        xi_dir = torch.randn(1, N, dim, generator=gen, dtype=torch.float64).to(device)
        xi_dir /= xi_dir.norm()
        for attn in ("std", "diff"):
            torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
            blocks = [da.Block(dim=dim, heads=heads, attn=attn, lambda_init=0.8, layer_index=i).double().to(device)
                      for i in range(D)]
            for e in eps:
                xi = xi_dir * e * X.norm()
                a, b = X, X + xi
                with torch.no_grad():
                    for i, blk in enumerate(blocks):
                        a, b = blk(a), blk(b)
                        if i + 1 in depths:
                            out[str(e)][attn][list(depths).index(i + 1)].append(((b - a).norm() / xi.norm()).item())
    summary = {}
    for e in eps:
        s, d = ([sum(v) / len(v) for v in out[str(e)][k]] for k in ("std", "diff"))
        summary[str(e)] = {"depth": list(depths), "std": s, "diff": d, "diff_over_std": [b / a for a, b in zip(s, d)]}
    return summary


def run(samples: int, seed: int, device, json_path=None, depth_trials: int = 4, quiet: bool = False) -> dict:
    t0 = time.time()
    torch.manual_seed(seed)
    layers = check_layers(samples, seed, device)
    rows = layers["rows"]
    extremes = check_extremes(device)
    fd = check_finite_differences(device, seed)
    depth = depth_experiment(seed, device, trials=depth_trials)
    v2 = check_v2(max(12, samples // 4), seed, device)["rows"]
    neg = [r for r in rows if r["cos"] < 0]
    checks = [
        ("Lemma 1, full Jacobians: ||J_DA||^2 = ||J1||^2 + l^2||J2||^2 - 2l||J1||||J2||cos",
         max(r["lemma1_rel_err"] for r in rows) <= TOL, f"max rel err {max(r['lemma1_rel_err'] for r in rows):.1e}"),
        ("Lemma 1, directional derivatives J v", max(r["lemma1_dir_rel_err"] for r in rows) <= TOL,
         f"max rel err {max(r['lemma1_dir_rel_err'] for r in rows):.1e}"),
        ("Theorem 1 bounds |1-l rho|||J1|| <= ||J_DA|| <= (1+l rho)||J1||", all(r["thm1_ok"] for r in rows),
         f"{sum(r['thm1_ok'] for r in rows)}/{len(rows)} samples"),
        ("Theorem 1 equality at cos = +1 (A2 = A1)", extremes["cos=+1"]["rel_err"] <= 1e-8,
         f"cos {extremes['cos=+1']['cos']:.12f}, rel err {extremes['cos=+1']['rel_err']:.1e}"),
        ("Theorem 1 equality at cos = -1 (2 tokens, Q2 = -Q1)", extremes["cos=-1"]["rel_err"] <= 1e-8,
         f"cos {extremes['cos=-1']['cos']:.12f}, rel err {extremes['cos=-1']['rel_err']:.1e}"),
        ("Theorem 1 amplification: cos < 0 => ||J_DA|| > sqrt(||J1||^2 + l^2||J2||^2)",
         all(r["amplified"] for r in neg), f"{sum(bool(r['amplified']) for r in neg)}/{len(neg)} samples with cos < 0"),
        ("Theorem 2, base = branch 1 (gamma = 1)", max(r["thm2_self_rel_err"] for r in rows) <= TOL,
         f"max rel err {max(r['thm2_self_rel_err'] for r in rows):.1e}"),
        ("Theorem 2, base = independent standard layer", max(r["thm2_indep_rel_err"] for r in rows) <= TOL,
         f"max rel err {max(r['thm2_indep_rel_err'] for r in rows):.1e}"),
        ("Theorem 3 iff, base = branch 1 (cos < l rho / 2)", all(r["thm3_self_agree"] for r in rows),
         f"agrees on {sum(r['thm3_self_agree'] for r in rows)}/{len(rows)}"),
        ("Theorem 3 iff, base = independent standard layer", all(r["thm3_indep_agree"] for r in rows),
         f"agrees on {sum(r['thm3_indep_agree'] for r in rows)}/{len(rows)}"),
        ("Lemma 2 first order: FD ratio -> ||J u|| with error ~ t", 0.8 <= fd["slope_1e-6_to_1e-4"] <= 1.2
         and fd["rel_err"][1] < 1e-4, f"rel err {fd['rel_err'][1]:.1e} at t=1e-6, {fd['rel_err'][3]:.1e} at 1e-4, "
                                      f"slope {fd['slope_1e-6_to_1e-4']:.2f}"),
        ("Lemma 2 via ||J||_2 <= ||J||_F: L_DA <= gamma kappa ||J_base||_F", all(r["lemma2_rigorous_ok"] for r in rows),
         f"{sum(r['lemma2_rigorous_ok'] for r in rows)}/{len(rows)} samples"),
        ("DA V2 (our extension): the layer's J_A = J1 - S J2 - A2 * J_gate", max(r["chain_rel_err"] for r in v2) <= TOL,
         f"max rel err {max(r['chain_rel_err'] for r in v2):.1e} on {len(v2)} random V2 layers"),
        ("DA V2 (our extension): Lemma 1, gate fixed: ||J1 - S J2|| = ||J1|| kappa(lambda = 1)",
         max(r["lemma1_rel_err"] for r in v2) <= TOL, f"max rel err {max(r['lemma1_rel_err'] for r in v2):.1e}"),
    ]
    lines = [f"{'PASS' if ok else 'FAIL'}  {name}: {detail}" for name, ok, detail in checks]
    lines.append("")
    lines.append(f"Lemma 2 read literally (L = spectral norms): L_DA / L_base <= gamma kappa on "
                 f"{sum(r['lemma2_literal_holds'] for r in rows)}/{len(rows)} samples (not implied: gamma, kappa are "
                 f"Frobenius quantities)")
    lines.append("finite differences: rel err by t = " +
                 ", ".join(f"{t:.0e}: {e:.1e}" for t, e in zip(fd["t"], fd["rel_err"])))
    lines.append("")
    lines.append("negative alignment and amplification kappa = sqrt(1 + l^2 rho^2 - 2 l rho cos) per lambda_init:")
    per_lambda = {}
    for li in LAMBDA_INITS:
        rs = [r for r in rows if r["lambda_init"] == li]
        if not rs:
            continue
        k = torch.tensor([r["kappa"] for r in rs])
        q = torch.quantile(k, torch.tensor([0.1, 0.5, 0.9], dtype=k.dtype)).tolist()
        per_lambda[str(li)] = {"n": len(rs), "frac_cos_neg": sum(r["cos"] < 0 for r in rs) / len(rs),
                               "mean_cos": sum(r["cos"] for r in rs) / len(rs), "kappa_mean": k.mean().item(),
                               "kappa_q10_50_90": q, "frac_more_sensitive_than_branch1": sum(
                                   r["kappa"] > 1 for r in rs) / len(rs)}
        p = per_lambda[str(li)]
        lines.append(f"  lambda_init {li}: n={p['n']}, cos<0 in {100 * p['frac_cos_neg']:.0f}%, mean cos "
                     f"{p['mean_cos']:+.3f}, kappa mean {p['kappa_mean']:.3f} (q10/50/90 "
                     f"{q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}), ||J_DA|| > ||J1|| in {100 * p['frac_more_sensitive_than_branch1']:.0f}%")
    lines.append(f"  DA V2 (S J2 for J2, lambda = 1): n={len(v2)}, cos<0 in "
                 f"{100 * sum(r['cos'] < 0 for r in v2) / len(v2):.0f}%, kappa mean "
                 f"{sum(r['kappa'] for r in v2) / len(v2):.3f}; the gate's own term is "
                 f"{sum(r['gate_share'] for r in v2) / len(v2):.2f} of ||J_A|| on average")
    lines.append("")
    lines.append("depth: mean ||f_D(X+xi) - f_D(X)|| / ||xi|| over random stacks (DA / standard):")
    for e, d in depth.items():
        ratios = " ".join(f"{r:.2f}" for r in d["diff_over_std"])
        lines.append(f"  ||xi|| = {float(e):g} ||X||, D = 1..{d['depth'][-1]}: {ratios}")
        lines.append(f"    growth ||Delta|| / ||xi||, D = 1 / 6 / 12: standard {d['std'][0]:.2f} / {d['std'][5]:.2f} / "
                     f"{d['std'][11]:.2f}, DA {d['diff'][0]:.2f} / {d['diff'][5]:.2f} / {d['diff'][11]:.2f}")
        side = [0 if abs(r - 1) <= 0.01 else (1 if r > 1 else -1) for r in d["diff_over_std"]]  # +-1% = level
        flips = [D for D, a, b in zip(d["depth"][1:], side, side[1:]) if a * b < 0]
        where = {1: "above", -1: "below", 0: "level with (within 1%)"}[side[-1]]
        lines.append(f"    DA {where} standard at D = {d['depth'][-1]}; crossover (beyond +-1%) at D = "
                     f"{flips if flips else 'none'}")
    lines.append(f"\n{len(rows)} random layers, seed {seed}, device {device}, float64, "
                 f"torch {torch.__version__}, {time.time() - t0:.1f} s")
    report = "\n".join(lines)
    if not quiet:
        print(report)
    result = {"checks": [{"statement": n, "pass": ok, "detail": d} for n, ok, d in checks], "rows": rows,
              "extremes": extremes, "finite_differences": fd, "alignment_by_lambda_init": per_lambda,
              "depth": depth, "v2": v2, "seed": seed, "samples": samples, "depth_trials": depth_trials,
              "environment": provenance(device), "report": report}
    if json_path:  # atomically: a reader never sees half a file
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
        os.replace(tmp, path)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--depth-trials", type=int, default=16, help="random stacks per depth and attention type")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    res = run(args.samples, args.seed, torch.device(args.device), args.json, depth_trials=args.depth_trials)
    return 0 if all(c["pass"] for c in res["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
