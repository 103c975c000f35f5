"""Wanda++ (Yang et al., Findings of ACL 2025, arXiv 2503.04992): regional gradients + regional optimisation.

No official code exists; this follows docs/methods.md, and every uncertain choice is an option:

- Regional gradient (RG): for each calibration sample n, ``loss_n = ||f_l(X_n)||_2`` -- the plain L2 norm of the
  whole output of block l, no labels -- and one backward pass through that block alone to its Linear weights.
  ``G = sqrt(mean_n grad_n^2)``, on the block *before* it is pruned, with inputs from the pruned earlier blocks.
- RGS score: ``S = (alpha * G + ||X_j||_2) * |W|``; ``alpha`` (default 100) weighs two terms, so the scale of
  ``||X_j||`` matters: ``act_norm='sum'`` is the paper's formula (over all tokens), ``'mean'`` the Wanda code's.
- Regional optimisation (RO): a frozen dense copy of the block is the teacher. ``ro_iters`` rounds of: draw
  ``ro_samples`` samples, prune with RGS (activation norms on the current weights, see ``ro_norms``), then one RMSprop
  step per sample (``ro_lr``, fp32) on the Linear weights, minimising ``sum((f_dense(X) - f(X))^2)``. A final prune
  with all samples leaves the saved block exactly sparse (under ``ro_mask='free'``; see ``ro_mask`` for the
  default). ``ro_iters=0`` is the RGS-only ablation.
- RO step: RMSprop moves each weight by about ``ro_lr`` per step whatever the weight's size, so the paper's 3e-7
  (set for 7B models) barely moves a small model's larger weights. ``ro_step='relative'`` makes the rate of each
  Linear ``ro_lr`` times the RMS of its dense weights: one setting then moves weights of any scale alike.
- ``ro_batch``: samples per optimiser step, their losses summed (1: the paper's one step per sample). The windows
  of a step run as one batch when the block's arguments merge (``Activations.merged``), which is faster on any
  device; the gradient is the same either way.
- ``ro_optim``: RMSprop (the paper's, the default) or Adam. torch's RMSprop keeps no bias correction, so its
  first steps are up to 10x ``ro_lr`` (the squared-gradient average starts at zero) and it settles to about 1.5x by
  step 64; Adam's bias-corrected steps stay at or under ``ro_lr`` and carry momentum across the steps' windows.
- ``ro_dtype``: RO's forward and backward passes in fp32 (default) or under bf16 autocast (``bf16``): the weights,
  the optimiser state and the loss stay fp32, only the matrix products run in bf16. Meant for hardware with bf16
  matrix units (recent GPUs, CPUs with AMX), where RO's steps are the bulk of Wanda++'s cost; a CPU without them
  emulates bf16 and is several times slower (benchmarks/README.md, Wanda++ cost). Not yet timed on a GPU.
- ``ro_norms`` (``ro_mask='free'`` only): where the re-prunes of RO (each round after the first, and the final
  prune) take ``||X_j||``.
  ``pass``: a separate pass over the round's samples on the current weights, and over all samples for the final
  prune (the paper's order; 0.5 block passes a round and 1 for the final prune, a sixth of Wanda++'s prune time).
  ``steps``: from RO's own forward passes of the round before, gathered as they run -- each Linear's inputs on the
  weights as they are being optimised -- so no pass is added. ``mixed`` (default): the rounds' from the steps, the
  final prune's from a pass over ``ro_samples`` fresh samples on the final weights (0.5 block passes): the mask
  that is saved comes from the weights it is applied to. On the 2:4 tuning slices (benchmarks/README.md) steps and
  mixed equal pass on SmolLM2; on Gemma-3-270M steps loses 7% and mixed 3%. A Linear the samples never reached (an
  expert no token was routed to) takes the dense pass's norms.
- ``--true-sequential``: the final prune (the only one, with ``ro_iters=0``) is one pass over all samples that
  prunes each Linear as its input arrives -- the order of the reproduction the paper points to -- and its output
  is the pruned block's, which saves the engine's propagation pass.
- ``ro_mask``: the paper's RO steps move every weight of the Linears, the ones the round's prune zeroed too (so do
  the reproduction's), and the next prune may choose another mask; the final prune then zeroes weights RO had
  been compensating with, with no step after it (``free``). ``fixed`` (default) masks the pruned weights' gradients
  instead: RO reconstructs under the first round's mask, which is the one saved, so neither the later rounds'
  re-prunes nor the final prune run (they would only choose it again; ``ro_norms`` and ``--true-sequential`` have
  nothing to order, and are refused). That first prune reaches every Linear: an expert the round's draw missed takes
  the dense pass's norms over all samples, one no sample reached magnitude's mask. On the 2:4 test split it gives
  in the same run 44.60 against 46.16 on SmolLM2-135M and 129.57 against 139.88 on Gemma-3-270M; 44.61 and 121.90
  as the default runs now, without the re-prunes (benchmarks/README.md, "Wanda++").
- ``preset='paper'``: the paper's settings (``PAPER``) for every option not given.

The defaults are not the paper's: ``alpha=0``, two RO rounds of 32 samples, a relative step of 1e-3, the
``fixed`` mask (``mixed`` norms under ``free``). They were chosen by the 2:4 ablation on calibration slices of SmolLM2-135M and Gemma-3-270M
(benchmarks/README.md, Wanda++ ablation), where the gradient term made the masks worse at every weight tried and the
paper's 3e-7 absolute step barely moved the weights. In block passes over the 64 windows: the dense pass about 0.75
(it runs only the windows RO's rounds draw -- two draws of 32 reach about 48 -- since without the gradient term
nothing reads the others; blocks with experts run them all), RO's 64 forward + backward steps about 3.4, the
propagation 1 (under ``free``, the final prune's statistics 0.5 more), against Wanda's 2 (benchmarks/README.md,
Wanda++ cost, for the measured ratios); the first round's mask reuses the dense pass's norms, since its weights are
still dense.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from llmprune import engine, experts
from llmprune import units
from llmprune.errors import UserError
from llmprune.masks import select
from llmprune.methods.base import BlockContext, Method
from llmprune.options import non_negative, option, positive
from llmprune.stats import RowNorms


@dataclass(frozen=True)
class Options:
    alpha: float = option(0.0, "Wanda++: weight of the regional gradient in the RGS score (the paper: 100; 0 skips "
                          "the gradients).", check=non_negative)
    act_norm: str = option("sum", "Wanda++: ||X_j|| as 'sum' over all tokens (paper) or 'mean' (Wanda code).",
                           choices=("sum", "mean"))
    ro_iters: int = option(2, "Wanda++: rounds of regional optimisation (0: RGS only; the paper: 5).",
                           check=non_negative)
    ro_samples: int = option(32, "Wanda++: samples drawn per RO round.", check=positive)
    ro_lr: float = option(1e-3, "Wanda++: RMSprop learning rate of RO (with the default relative step, a fraction "
                          "of each Linear's weight RMS; the paper: 3e-7 absolute).", check=positive)
    ro_step: str = option("relative", "Wanda++: --ro-lr as RMSprop's own rate ('absolute', the paper) or times each "
                          "Linear's weight RMS ('relative': the same for weights of any scale).",
                          choices=("absolute", "relative"))
    ro_batch: int = option(1, "Wanda++: RO samples per optimiser step (their losses summed; run as one batch when "
                           "the block's arguments allow).", check=positive)
    ro_optim: str = option("rmsprop", "Wanda++: RO's optimiser: RMSprop (the paper's) or Adam (momentum over RMSprop's "
                           "scaling, bias-corrected: at one --ro-lr its early steps are smaller).",
                           choices=("rmsprop", "adam"))
    ro_dtype: str = option("fp32", "Wanda++: RO's forward and backward passes in fp32 or under bf16 autocast "
                           "(weights, optimiser state and loss stay fp32).", choices=("fp32", "bf16"))
    ro_norms: str = option("mixed", "Wanda++, with --ro-mask free: ||X_j|| of the re-prunes: the rounds' from RO's own forward passes "
                           "and the final prune's from a pass over --ro-samples samples ('mixed'), all from RO's "
                           "passes ('steps', no extra pass), or all from separate passes on the current weights "
                           "('pass', the paper's order).", choices=("mixed", "steps", "pass"))
    ro_mask: str = option("fixed", "Wanda++: RO's steps move only the weights the first round's mask keeps, and that "
                          "mask is final ('fixed': RO reconstructs under the mask that is saved, with no re-prune "
                          "after it), or every weight, the pruned ones too, each later round and a final prune "
                          "choosing the mask again ('free', the paper's).", choices=("fixed", "free"))
    seed: int = option(0, "Wanda++: seed of the RO sample draws.")
    preset: str = option("none", "Wanda++: 'paper' takes the paper's settings for every Wanda++ option not given.",
                         choices=("none", "paper"))


# Yang et al. 2025 (sec. 4 and the reproduction their arXiv v3 points to): what ``--preset paper`` sets.
PAPER = {"alpha": 100.0, "act_norm": "sum", "ro_iters": 5, "ro_samples": 32, "ro_lr": 3e-7, "ro_step": "absolute",
         "ro_batch": 1, "ro_optim": "rmsprop", "ro_norms": "pass", "ro_dtype": "fp32", "ro_mask": "free"}


def ro_rates(weights: list[torch.Tensor], lr: float, step: str) -> list[float]:
    """The optimiser rate of each weight: ``lr``, or ``lr * RMS(W)`` (``relative``), from the weights as given."""
    if step == "absolute":
        return [lr] * len(weights)
    return [lr * float(w.detach().float().pow(2).mean().sqrt()) for w in weights]


def ro_optimiser(kind: str, weights: list[torch.Tensor], rates: list[float]) -> torch.optim.Optimizer:
    """RO's optimiser over the Linear weights, one parameter group (rate) per weight. Neither decays a weight, and
    a weight whose gradient has always been zero (pruned, under ``ro_mask='fixed'``) has zero moments, so neither
    moves it. Adam adds momentum to RMSprop's per-weight normalisation (Kingma & Ba 2015): RO's gradients come
    from one window a step, and averaging them over steps is what momentum does."""
    groups = [{"params": [w], "lr": r} for w, r in zip(weights, rates)]
    return torch.optim.Adam(groups) if kind == "adam" else torch.optim.RMSprop(groups)


def rgs_score(weight: torch.Tensor, grad_rms: torch.Tensor | None, norms: torch.Tensor, alpha: float) -> torch.Tensor:
    """``S_ij = (alpha * G_ij + ||X_j||) * |W_ij|`` (Wanda++ eq. 3). With ``alpha = 0`` it is Wanda's score, and
    ``G`` may be ``None`` (not computed)."""
    if alpha == 0 or grad_rms is None:
        return norms.reshape(1, -1) * weight.abs().float()
    return (alpha * grad_rms + norms.reshape(1, -1)) * weight.abs().float()


class DensePass:
    """One pass over the calibration samples through the dense block that yields, per sample: the regional
    gradients (accumulated into their RMS), each Linear's input sums of squares (so the norms of any subset of
    samples are known without another pass), and -- when RO needs them -- the dense outputs, the RO targets.

    With ``need_grads=False`` (``alpha = 0``: the score does not use ``G``) the pass is forward-only; the backward
    pass is two thirds of its cost, and ``grads`` is ``None`` for every Linear."""

    def __init__(self, block, acts: engine.Activations, device: str, keep_outputs: bool, need_grads: bool = True,
                 only: list[int] | None = None):
        with experts.routed_block(block):  # each expert's norms and gradients from the tokens routed to it
            self._run(block, acts, device, keep_outputs, need_grads, only)

    def _run(self, block, acts: engine.Activations, device: str, keep_outputs: bool, need_grads: bool,
             only: list[int] | None) -> None:
        linears = units.block_linears(block)
        self.names = list(linears)
        weights = [lin.weight for lin in linears.values()]
        sq = [torch.zeros_like(w, dtype=torch.float32) if need_grads else None for w in weights]
        # sample index -> that sample's sums of squares; an expert no token of a sample was routed to has no entry
        self.sample_sq: dict[str, dict[int, torch.Tensor]] = {n: {} for n in self.names}
        # ``only``: the samples RO will use (the others' outputs and norms would be computed and never read);
        # the regional gradients' RMS is over every sample, so a pass that computes them runs them all.
        assert only is None or not need_grads
        run = range(acts.n_samples) if only is None else sorted(set(only))
        self.outputs: list[torch.Tensor | None] = [None] * acts.n_samples
        current = [0]

        def make_hook(name):
            def hook(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                self.sample_sq[name][current[0]] = x.pow(2).sum(0)

            return hook

        handles = [lin.register_forward_pre_hook(make_hook(n)) for n, lin in linears.items()]
        flags = [w.requires_grad for w in weights]
        dtype = weights[0].dtype
        for w in weights:
            w.requires_grad_(need_grads)
        try:
            with torch.set_grad_enabled(need_grads):
                for i in run:
                    h, kw = acts.hidden[i], acts.kwargs[i]
                    current[0] = i
                    out = engine.block_output(block, h.to(device=device, dtype=dtype), kw)
                    if keep_outputs:
                        self.outputs[i] = out.detach().float().to(h.device)  # where the activations live
                    if need_grads:
                        # allow_unused: an expert no token of this sample was routed to takes no part in it
                        grads = torch.autograd.grad(out.float().norm(), weights, allow_unused=True)
                        for s_, g in zip(sq, grads):
                            if g is not None:
                                s_.add_(g.float().pow(2))
        finally:
            for w, f in zip(weights, flags):
                w.requires_grad_(f)
            for handle in handles:
                handle.remove()
        n = max(acts.n_samples, 1)
        self.grads = {name: (s_ / n).sqrt() if need_grads else None for name, s_ in zip(self.names, sq)}

    def norms(self, idx: list[int], convention: str, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """``||X_j||`` of each Linear's input over the samples ``idx`` the pass ran, on the dense weights (absent for
        an expert none of those samples was routed to). The ``mean`` convention divides by the samples that reached
        it."""
        out = {}
        for name in self.names if names is None else names:
            seen = [self.sample_sq[name][i] for i in idx if i in self.sample_sq[name]]
            if seen:
                total = torch.stack(seen).sum(0)
                out[name] = (total if convention == "sum" else total / len(seen)).sqrt()
        return out

    def fill(self, norms: dict[str, torch.Tensor], idx: list[int], convention: str) -> dict[str, torch.Tensor]:
        """``norms``, with the dense pass's over ``idx`` for any Linear they lack (an expert the samples behind
        ``norms`` never reached); only those are computed."""
        missing = [n for n in self.names if n not in norms]
        if not missing:
            return norms
        dense = self.norms(idx, convention, missing)
        return {**dense, **norms}


def regional_gradients(block, acts: engine.Activations, device: str) -> dict[str, torch.Tensor]:
    """``G = sqrt(mean_n (d ||f(X_n)||_2 / dW)^2)`` for every Linear of the block, one sample at a time."""
    return DensePass(block, acts, device, keep_outputs=False).grads


@torch.no_grad()
def _apply_rgs(ctx: BlockContext, grads, norms: dict[str, torch.Tensor], scale: float = 1.0,
               final: bool = True) -> dict[str, torch.Tensor]:
    """Prune with RGS; returns the mask each Linear was pruned with (True: pruned). Norms from a subset of
    ``1/scale**2`` of the samples are scaled by ``scale`` under the ``sum`` convention, to estimate the norm over all
    samples, so ``alpha`` keeps its weight.

    An expert without norms received no token: the final prune falls back to magnitude for it (its mask: its zeros
    after that); an intermediate prune of regional optimisation (a subset of the samples) leaves it for the final
    one."""
    opts: Options = ctx.spec.options
    if opts.act_norm != "sum":
        scale = 1.0
    masks = {}
    for name, lin in ctx.linears.items():
        if name not in norms:
            if final:
                ctx.fallback(name, lin)
                masks[name] = lin.weight.detach() == 0
            continue
        w = lin.weight.data
        masks[name] = select(rgs_score(w, grads[name], norms[name] * scale, opts.alpha), ctx.spec.pattern,
                             ctx.spec.sparsity)
        w.masked_fill_(masks[name], 0)
    return masks


@torch.no_grad()
def _prune_rgs(ctx: BlockContext, acts: engine.Activations, grads, scale: float, final: bool = True) -> None:
    """Prune with RGS, the activation norms recomputed on the block's current weights over ``acts``."""
    convention = ctx.spec.options.act_norm
    stats = engine.collect(ctx.block, acts, ctx.device, RowNorms)
    _apply_rgs(ctx, grads, {n: s.norms(convention) for n, s in stats.items()}, scale, final)


def ro_draws(opts: Options, n: int, index: int) -> list[list[int]]:
    """The samples of each RO round: ``ro_samples`` of the ``n`` drawn afresh each round, seeded by the block."""
    rng = random.Random(opts.seed * 100_003 + index)
    m = min(opts.ro_samples, n)
    return [rng.sample(range(n), m) for _ in range(opts.ro_iters)]


def regional_optimisation(ctx: BlockContext, dense: DensePass, draws: list[list[int]]) -> dict[str, torch.Tensor] | None:
    """Optimise the block's Linears towards the dense block's outputs (one round per draw, each pruned first).

    Returns, unless ``ro_norms='pass'`` (then ``None``), the last round's ``||X_j||`` as its forward passes saw
    them, scaled to all samples: the final prune's norms under ``'steps'``."""
    # One routed session for the whole optimisation: the optimiser holds the experts' views from start to end.
    with experts.routed_block(ctx.block):
        return _regional_optimisation(ctx, dense, draws)


class StepNorms:
    """``||X_j||`` of every Linear's inputs gathered by forward pre-hooks while RO's steps run: the norms of the
    round's samples on the weights as they are optimised, at the cost of one square-and-sum per input (a separate
    statistics pass over the same samples is half a block pass a round). Hooks see inputs that require grad; the
    statistic holds no graph."""

    def __init__(self, linears: dict[str, torch.nn.Module]):
        self.stats: dict[str, RowNorms] = {}
        self._handles = [lin.register_forward_pre_hook(self._hook(n)) for n, lin in linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            if name not in self.stats:
                self.stats[name] = RowNorms(module)
            self.stats[name].add(args[0].detach())

        return hook

    def take(self, convention: str) -> dict[str, torch.Tensor]:
        """This round's norms, and a fresh start for the next round's."""
        out = {n: s.norms(convention) for n, s in self.stats.items()}
        self.stats = {}
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _regional_optimisation(ctx: BlockContext, dense: DensePass, draws: list[list[int]]) -> dict[str, torch.Tensor] | None:
    opts: Options = ctx.spec.options
    block, acts, device = ctx.block, ctx.acts, ctx.device
    orig_dtype = next(block.parameters()).dtype
    block.float()  # RO runs in fp32 whatever the model's dtype
    linears = ctx.linears
    weights = [lin.weight for lin in linears.values()]
    # Only the Linear weights are optimised: every other parameter of the block (norms, biases) is frozen for
    # the duration, so the backward pass neither computes nor accumulates gradients nobody reads.
    params = list(block.parameters())
    flags = [p.requires_grad for p in params]
    ids = {id(w) for w in weights}
    for p in params:
        p.requires_grad_(id(p) in ids)
    # Rates from the dense weights: the block is not pruned yet (the first round prunes it below).
    opt = ro_optimiser(opts.ro_optim, weights, ro_rates(weights, opts.ro_lr, opts.ro_step))
    n = acts.n_samples
    m = min(opts.ro_samples, n)
    scale = (n / m) ** 0.5  # a round's norms (m samples) to the scale of all n under the 'sum' convention
    fixed = opts.ro_mask == "fixed"
    seen = StepNorms(linears) if opts.ro_norms != "pass" and not fixed else None
    last: dict[str, torch.Tensor] = {}
    pruned: list[torch.Tensor] | None = None
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=opts.ro_dtype == "bf16")
    try:
        for k, idx in enumerate(draws):
            if k == 0:  # the weights are still dense: the dense pass already has these samples' norms
                norms = dense.norms(idx, opts.act_norm)
                if fixed:
                    # Every Linear takes its mask now, for good: an expert this draw never reached takes the dense
                    # pass's norms over every sample (divided by the round's scale, which _apply_rgs multiplies
                    # in), one no sample reached the magnitude fallback.
                    filled = dense.fill(norms, list(range(n)), opts.act_norm)
                    norms = {name: v if name in norms else v / scale for name, v in filled.items()}
                masks = _apply_rgs(ctx, dense.grads, norms, scale, final=fixed)
                # 'fixed': the pruned weights stay at zero through every step (their gradients are masked, and
                # RMSprop, without momentum or decay, moves a weight whose gradient is zero not at all). The mask is
                # the prune's own: a kept weight that happens to be exactly zero (dequantized checkpoints hold some)
                # is trained like any other.
                pruned = [masks[name] for name in linears] if fixed else None
            elif fixed:  # the first round's mask is final: a re-prune would only choose it again
                pass
            elif seen is not None:  # the norms the previous round's steps saw
                _apply_rgs(ctx, dense.grads, last, scale, final=False)
            else:
                _prune_rgs(ctx, acts.subset(idx), dense.grads, scale, final=False)
            for start in range(0, m, opts.ro_batch):
                opt.zero_grad(set_to_none=True)
                for h, kw, target in _batches(acts, dense.outputs, idx[start:start + opts.ro_batch]):
                    with autocast:
                        out = engine.block_output(block, h.to(device=device, dtype=torch.float32), kw)
                    # The loss in fp32 whatever the products ran in; backward accumulates over the step's windows.
                    ((out.float() - target.to(out.device)) ** 2).sum().backward()
                if pruned is not None:
                    for w, zero in zip(weights, pruned):
                        if w.grad is not None:
                            w.grad.masked_fill_(zero, 0)
                opt.step()
            if seen is not None:
                last = seen.take(opts.act_norm)
    finally:
        if seen is not None:
            seen.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    block.to(orig_dtype)
    if seen is None:
        return None
    factor = scale if opts.act_norm == "sum" else 1.0
    return {name: v * factor for name, v in last.items()}


def _batches(acts: engine.Activations, targets: list[torch.Tensor], idx: list[int]):
    """The samples ``idx`` as (inputs, arguments, dense outputs): one batch when their arguments merge, else one
    sample at a time (the same summed loss and gradient, only slower)."""
    if len(idx) > 1:
        try:
            one = acts.merged(idx)
        except ValueError:
            pass
        else:
            yield one.hidden[0], one.kwargs[0], torch.cat([targets[i] for i in idx])
            return
    for i in idx:
        yield acts.hidden[i], acts.kwargs[i], targets[i]


@torch.no_grad()
def _prune_rgs_sequential(ctx: BlockContext, grads) -> None:
    """The final prune as one pass that prunes each Linear as its input arrives, on every sample at once (the
    ``--true-sequential`` schedule; the order of the reproduction the paper points to): later Linears' norms come
    from the pruned earlier ones, and the pass's output is the pruned block's, so the engine need not run it again."""
    opts: Options = ctx.spec.options
    try:
        one = ctx.acts.merged()
    except ValueError as e:
        raise UserError(f"--true-sequential: this model's block arguments cannot be batched ({e}); run without it")

    def prune(name: str, lin, stat: RowNorms) -> None:
        w = lin.weight.data
        score = rgs_score(w, grads[name], stat.norms(opts.act_norm), opts.alpha)
        w.masked_fill_(select(score, ctx.spec.pattern, ctx.spec.sparsity), 0)
        done.add(name)

    done: set[str] = set()
    out = engine.sequential_pass(ctx.block, one, ctx.device, RowNorms, prune).hidden[0]
    for name, lin in ctx.linears.items():
        if name not in done:
            ctx.fallback(name, lin)
    # Back into one chunk per sample, as the next block's regional gradients need them.
    sizes = [h.shape[0] for h in ctx.acts.hidden]
    ctx.outputs = ctx.acts.replaced(list(out.split(sizes)))


class WandaPP(Method):
    name = "wandapp"
    label = "Wanda++"
    summary = "regional gradients + regional optimisation of each block (Yang et al. 2025)"
    Options = Options
    per_sample = True  # regional gradients are per sample: the engine gives this method chunks of one window
    true_sequential = True  # the final prune (or the RGS-only one) as one pass over all samples

    def options(self, given):
        norms_given = given.get("ro_norms") is not None  # by the user, not by the preset
        if given.get("preset") == "paper":
            given = {**PAPER, **{k: v for k, v in given.items() if v is not None}}
        opts = super().options(given)
        if norms_given and opts.ro_mask == "fixed" and opts.ro_iters > 0:
            raise UserError("--ro-norms chooses the norms of RO's re-prunes, and under --ro-mask fixed (the default) "
                            "nothing is re-pruned: the first round's mask is final; add --ro-mask free")
        return opts

    def check_request(self, options: Options, true_sequential: bool) -> None:
        if true_sequential and options.ro_mask == "fixed" and options.ro_iters > 0:
            raise UserError("--true-sequential orders Wanda++'s final prune, and under --ro-mask fixed (the default) "
                            "there is none: the first round's mask is final; add --ro-mask free, or --ro-iters 0")

    def warnings(self, options: Options, calibration_samples: int) -> list[str]:
        if options.ro_iters > 0 and calibration_samples < 64:
            return [f"regional optimisation with {calibration_samples} calibration samples: the Wanda++ paper "
                    "reports instability below 64"]
        return []

    def prune_block(self, ctx: BlockContext) -> None:
        opts: Options = ctx.spec.options
        draws = ro_draws(opts, ctx.acts.n_samples, ctx.index)
        # With RO and no gradients, the dense pass runs only the samples the rounds draw (two rounds of 32 of 64
        # reach about 48): the rest of the pass's outputs and norms would never be read -- every later prune takes
        # its norms from RO's steps or its own pass. Except for experts under 'fixed', 'steps' or 'mixed': one those
        # norms never reached takes the dense pass's norms over every sample (``dense.fill``), so that pass runs
        # them all.
        skip = opts.alpha == 0 and (not experts.has_experts(ctx.block) or (opts.ro_norms == "pass"
                                                                            and opts.ro_mask == "free"))
        only = sorted({i for d in draws for i in d}) if draws and skip else None
        dense = DensePass(ctx.block, ctx.acts, ctx.device, keep_outputs=opts.ro_iters > 0,
                          need_grads=opts.alpha != 0, only=only)
        seen = regional_optimisation(ctx, dense, draws) if opts.ro_iters > 0 else None
        everyone = list(range(ctx.acts.n_samples))
        if opts.ro_iters > 0 and opts.ro_mask == "fixed":
            return  # RO kept the first round's mask on every Linear: a final prune would only choose it again
        if ctx.spec.true_sequential:
            _prune_rgs_sequential(ctx, dense.grads)
        elif opts.ro_iters > 0 and opts.ro_norms == "steps":  # the last round's norms; exact sparsity
            _apply_rgs(ctx, dense.grads, dense.fill(seen, everyone, opts.act_norm))
        elif opts.ro_iters > 0 and opts.ro_norms == "mixed":  # a pass over a round's worth of fresh samples
            n, m = ctx.acts.n_samples, min(opts.ro_samples, ctx.acts.n_samples)
            idx = random.Random(opts.seed * 100_003 + ctx.index + 50_001).sample(range(n), m)
            stats = engine.collect(ctx.block, ctx.acts.subset(idx), ctx.device, RowNorms)
            factor = (n / m) ** 0.5 if opts.act_norm == "sum" else 1.0
            final = {name: st.norms(opts.act_norm) * factor for name, st in stats.items()}
            _apply_rgs(ctx, dense.grads, dense.fill(final, everyone, opts.act_norm))
        elif opts.ro_iters > 0:
            _prune_rgs(ctx, ctx.acts, dense.grads, 1.0)  # the final prune, all samples: exact sparsity
        else:  # RGS only: the dense pass has the norms of all samples on these (dense) weights
            _apply_rgs(ctx, dense.grads, dense.norms(everyone, opts.act_norm))


METHOD = WandaPP()
