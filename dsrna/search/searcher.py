"""One iteration of the bilevel search (METHOD.md §4): an architecture step, then a weight step.

The architecture minimises ``L_val - gamma * R`` with Adam, either at the current weights (first
order) or at the weights after one virtual SGD step on ``L_train`` (second order, DARTS' unrolled
step with the finite-difference Hessian-vector product). The weights minimise ``L_train`` with SGD.

Under torch.distributed the weights are wrapped in DDP (which all-reduces their gradients in the
weight step); the architecture parameters are left out of DDP, broadcast from rank 0 once, and
their gradient is averaged over ranks explicitly, so every rank keeps the same architecture. The
architecture step runs the bare module, so it triggers no weight-gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from dsrna.search import distributed
from dsrna.search.config import SearchConfig
from dsrna.space import capture_batch_stats


def learning_rate(config: SearchConfig, epoch: int, world_size: int = 1) -> float:
    """The weights' learning rate in ``epoch`` (0-based): cosine from ``lr`` to ``lr_min`` over the
    run (DARTS), scaled by ``global_batch / lr_reference_batch`` when set and multiplied by
    ``(epoch + 1) / lr_warmup_epochs`` during the warm-up (PC-DARTS on ImageNet)."""
    scale = 1.0
    if config.lr_reference_batch:
        scale = config.batch_size * world_size / config.lr_reference_batch
    lr, lr_min = config.lr * scale, config.lr_min * scale
    value = lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * epoch / config.epochs))
    if epoch < config.lr_warmup_epochs:
        value *= (epoch + 1) / config.lr_warmup_epochs
    return value


def sgd_lookahead(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
                  eta: float, momentum: float, weight_decay: float) -> list[torch.Tensor]:
    """The weights after the SGD step ``optimizer`` would take with these gradients:
    ``w - eta * (momentum * buffer + grad + weight_decay * w)`` (DARTS' unrolled model)."""
    out = []
    with torch.no_grad():
        for w, g in zip(weights, grads):
            step = g + weight_decay * w
            buffer = optimizer.state.get(w, {}).get("momentum_buffer")
            if buffer is not None:
                step = step + momentum * buffer
            out.append(w - eta * step)
    return out


def finite_difference_hvp(net: torch.nn.Module, weights: Sequence[torch.Tensor], v: Sequence[torch.Tensor],
                          x: torch.Tensor, y: torch.Tensor, radius: float = 0.01,
                          criterion: Callable = F.cross_entropy) -> list[torch.Tensor]:
    """``(d^2 L_train / d alpha d w) v`` at weights ``weights`` by central differences:
    ``[grad_alpha L(w + eps v) - grad_alpha L(w - eps v)] / (2 eps)`` with ``eps = radius / ||v||``.

    ``weights`` and ``v`` follow ``net.weight_parameters()``; the net's own parameters are left
    untouched (the perturbed weights go in through ``functional_call``). Runs in the weights' dtype:
    a radius of 0.01 is below bf16 resolution, so never under autocast.
    """
    arch = net.arch_parameters()
    weight_ids = {id(p) for p in net.weight_parameters()}
    names = [name for name, p in net.named_parameters() if id(p) in weight_ids]
    eps = radius / torch.linalg.vector_norm(torch.cat([d.reshape(-1) for d in v]))
    sides = []
    for sign in (1.0, -1.0):
        params = {name: w.detach() + (sign * eps) * d.detach() for name, w, d in zip(names, weights, v)}
        with torch.autocast(x.device.type, enabled=False):
            loss = criterion(functional_call(net, params, (x,)), y)
        sides.append(torch.autograd.grad(loss, arch, allow_unused=True, materialize_grads=True))
    return [(plus - minus) / (2 * eps) for plus, minus in zip(*sides)]


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss in at least float32: bf16 logits (autocast) are raised, float64 ones kept (casting
    them down capped the second-order gradient's accuracy at float32's)."""
    return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), y)


@contextlib.contextmanager
def _frozen(params: Sequence[torch.Tensor]):
    """Parameters excluded from autograd inside (a step needs no gradient of the other set)."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _capturing(enabled: bool):
    """``capture_batch_stats()`` when a robustness term will need the statistics (it costs a mean
    and a variance per BN layer), else an empty store."""
    return capture_batch_stats() if enabled else contextlib.nullcontext({})


def _count(y: torch.Tensor) -> torch.Tensor:
    """The batch size as a tensor on ``y``'s device, written by a kernel (no host-to-device copy,
    which a CUDA graph capture forbids)."""
    return torch.full((), y.shape[0], device=y.device)


class Searcher:
    """Optimisers and the two steps of the search for one super-network ``net`` (a
    :class:`dsrna.SearchNetwork` already on its device). Steps return detached tensors and never
    synchronise with the host; the caller decides when to read them."""

    def __init__(self, net: torch.nn.Module, config: SearchConfig):
        if not (callable(getattr(net, "arch_parameters", None)) and callable(getattr(net, "weight_parameters", None))):
            raise TypeError(f"Searcher needs a dsrna.SearchNetwork (or a model with arch_parameters() and "
                            f"weight_parameters()), got {type(net).__name__}; for DARTS code see dsrna.compat.darts")
        self.net, self.config = net, config
        self.arch = net.arch_parameters()
        self.weights = net.weight_parameters()
        self.w_optimizer = torch.optim.SGD(self.weights, lr=config.lr, momentum=config.momentum,
                                           weight_decay=config.weight_decay)
        # capturable: Adam's step counts live on the GPU, so the step can be replayed as a CUDA graph.
        self.a_optimizer = torch.optim.Adam(self.arch, lr=config.arch_lr, betas=config.arch_betas,
                                            weight_decay=config.arch_weight_decay,
                                            capturable=self.arch[0].is_cuda)
        self.world_size = distributed.world_size()
        self.model = net
        if distributed.is_distributed():
            distributed.broadcast_(self.arch)
            arch_names = [n for n, p in net.named_parameters() if any(p is a for a in self.arch)]
            # DDP matches some ignore checks against "<module>.<param>", which for parameters of the
            # root module reads ".alphas_normal": list both spellings.
            ignored = arch_names + ["." + n for n in arch_names if "." not in n]
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, ignored)
            device_ids = [net.alphas_normal.device.index] if net.alphas_normal.is_cuda else None
            # BN running statistics are not used by the search (BN runs on batch statistics): no
            # broadcast. (torch 2.14 deprecates the keyword in favour of one torch 2.11 lacks.)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.model = torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids, broadcast_buffers=False)
        self._shadow = None  # the second-order step's unrolled copy, built once
        self.set_epoch(0)

    # --- schedule ---------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Enter ``epoch``: sets the cosine learning rate and whether the robustness term is on."""
        self.epoch = epoch
        self.lr = learning_rate(self.config, epoch, self.world_size)
        for group in self.w_optimizer.param_groups:
            group["lr"] = self.lr

    @property
    def robustness_active(self) -> bool:
        return self.config.robustness.active(self.epoch)

    @property
    def arch_active(self) -> bool:
        return self.epoch >= self.config.arch_start_epoch

    def _autocast(self, device: torch.device):
        # No weight-cast cache: every weight is used once per pass, and a CUDA graph capture forbids it.
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.amp == "bf16", cache_enabled=False)

    # --- objectives -------------------------------------------------------------------------------

    def _robustness(self, net, x, y, bn_stats) -> dict[str, torch.Tensor]:
        """R's terms on the first ``robust_batch`` examples (BN statistics of the whole clean batch)."""
        from dsrna.robustness import robustness_terms

        m = self.config.robustness.resolved_robust_batch() or x.shape[0]
        return robustness_terms(net, x[:m], y[:m], self.config.robustness, bn_stats)

    def _arch_objective(self, net, x, y):
        """``(L_val - gamma * R, L_val, logits, R's terms)`` of ``net`` on a validation batch (no terms
        while R is off). L_val's forward runs under ``capture_batch_stats`` so R sees the clean batch's
        BN statistics."""
        robust = self.robustness_active
        with self._autocast(x.device), _capturing(robust) as bn_stats:
            logits = net(x)
        val_loss = _cross_entropy(logits, y)
        if not robust:
            return val_loss, val_loss, logits, {}
        terms = self._robustness(net, x, y, bn_stats)
        return val_loss - self.config.robustness.gamma * sum(terms.values()), val_loss, logits, terms

    # --- steps ------------------------------------------------------------------------------------

    def arch_gradient(self, val_batch, train_batch=None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The gradient of ``L_val - gamma * R`` with respect to ``net.arch_parameters()`` (averaged
        over ranks), at the current weights (first order) or at the unrolled weights (second order,
        which needs ``train_batch``), and the step's metrics."""
        x, y = val_batch
        if self.config.order == 2:
            if train_batch is None:
                raise ValueError("the second-order architecture step needs the training batch too")
            grads, val_loss, logits, terms = self._unrolled_arch_gradient(train_batch, val_batch)
        else:
            # The weights are constants of this gradient: without them autograd keeps no tensor for
            # their gradients (R_CB's bound pass and R_Jac's double backward kept many).
            with _frozen(self.weights):
                loss, val_loss, logits, terms = self._arch_objective(self.net, x, y)
                # with fewer than 3 layers every cell reduces and the normal alphas get no gradient
                grads = torch.autograd.grad(loss, self.arch, allow_unused=True, materialize_grads=True)
        # R, and R_CB and R_Jac apart (a combined R logs both; zero while R is off)
        zero = val_loss.new_zeros(())
        metrics = {"val_loss": val_loss.detach(), "val_correct": (logits.argmax(1) == y).sum(), "val_count": _count(y),
                   "robustness": sum(terms.values(), zero).detach(),
                   **{f"robustness_{kind}": terms.get(kind, zero).detach() for kind in ("cb", "jacobian")}}
        return distributed.all_reduce_mean(grads), metrics

    def arch_step(self, val_batch, train_batch=None) -> dict[str, torch.Tensor]:
        """One Adam step on the architecture. Second order needs ``train_batch`` for the unrolled step."""
        grads, metrics = self.arch_gradient(val_batch, train_batch)
        for p, g in zip(self.arch, grads):
            p.grad = g
        self.a_optimizer.step()
        self.a_optimizer.zero_grad(set_to_none=True)
        return metrics

    def _shadow_network(self) -> torch.nn.Module:
        """The unrolled copy of the net (built once), with the net's modes and running statistics of
        the moment; the caller sets its weights and architecture."""
        if self._shadow is None:
            self._shadow = copy.deepcopy(self.net)
        for mine, theirs in zip(self._shadow.modules(), self.net.modules()):
            mine.training = theirs.training
        with torch.no_grad():
            for mine, theirs in zip(self._shadow.buffers(), self.net.buffers()):
                mine.copy_(theirs)
        return self._shadow

    def _unrolled_arch_gradient(self, train_batch, val_batch):
        xt, yt = train_batch
        xv, yv = val_batch
        eta = self.lr
        # w' = w - eta * (momentum * buffer + grad L_train(w) + wd * w): the SGD step the weights are
        # about to take, with the gradient averaged over ranks so every rank unrolls to the same w'.
        with self._autocast(xt.device):
            train_loss = _cross_entropy(self.net(xt), yt)
        g_train = distributed.all_reduce_mean(torch.autograd.grad(train_loss, self.weights))
        unrolled = sgd_lookahead(self.weights, g_train, self.w_optimizer, eta, self.config.momentum,
                                 self.config.weight_decay)
        shadow = self._shadow_network()
        shadow_arch, shadow_weights = shadow.arch_parameters(), shadow.weight_parameters()
        with torch.no_grad():
            for w_shadow, w_unrolled in zip(shadow_weights, unrolled):
                w_shadow.copy_(w_unrolled)
            for a_shadow, a in zip(shadow_arch, self.arch):
                a_shadow.copy_(a)
        loss, val_loss, logits, terms = self._arch_objective(shadow, xv, yv)
        grads = torch.autograd.grad(loss, shadow_arch + shadow_weights, allow_unused=True, materialize_grads=True)
        d_alpha, v = grads[:len(shadow_arch)], grads[len(shadow_arch):]
        v = distributed.all_reduce_mean(v)  # the same finite-difference direction on every rank
        hvp = finite_difference_hvp(shadow, self.weights, v, xt, yt, self.config.unrolled_radius)
        return [da - eta * h for da, h in zip(d_alpha, hvp)], val_loss, logits, terms

    def weight_step(self, train_batch) -> dict[str, torch.Tensor]:
        """One SGD step on the weights (architecture fixed), gradient clipped to ``grad_clip``."""
        x, y = train_batch
        inner_gamma = self.config.robustness.inner_gamma
        robust = inner_gamma > 0 and self.robustness_active
        with _frozen(self.arch):
            with self._autocast(x.device), _capturing(robust) as bn_stats:
                logits = self.model(x)
            loss = _cross_entropy(logits, y)
            train_loss = loss
            if robust:
                loss = loss - inner_gamma * sum(self._robustness(self.net, x, y, bn_stats).values())
            self.w_optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.weights, self.config.grad_clip)
        self.w_optimizer.step()
        return {"train_loss": train_loss.detach(), "train_correct": (logits.argmax(1) == y).sum(),
                "train_count": _count(y)}

    def step(self, train_batch, val_batch) -> dict[str, torch.Tensor]:
        """One search iteration: the architecture step (skipped before ``arch_start_epoch``), then
        the weight step."""
        metrics = self.arch_step(val_batch, train_batch) if self.arch_active else {}
        metrics.update(self.weight_step(train_batch))
        return metrics

    # --- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"w_optimizer": self.w_optimizer.state_dict(), "a_optimizer": self.a_optimizer.state_dict(),
                "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.w_optimizer.load_state_dict(state["w_optimizer"])
        # A GPU run's Adam is capturable (its step counts live on the GPU, for CUDA graphs), a CPU
        # run's is not. Resumed on the other kind of device, the saved groups are told first: Adam
        # places the loaded step counts by that flag (on the parameters' device when capturable).
        a_state = state["a_optimizer"]
        capturable = self.arch[0].is_cuda
        self.a_optimizer.load_state_dict(
            {**a_state, "param_groups": [{**group, "capturable": capturable} for group in a_state["param_groups"]]})
        self.set_epoch(int(state["epoch"]))
