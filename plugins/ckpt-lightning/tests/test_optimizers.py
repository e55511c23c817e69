"""ckpt_lightning.optimizers: a save finds the live optimizer behind Lightning's
``optimizer_states``, and the first step after a save runs its closure (training_step and
backward) before waiting for the background copy, with the same result as a plain step."""

from __future__ import annotations

import torch

from ckpt.testing import assert_same_state, clone_state
from ckpt_lightning import optimizers


class Copying:
    """Stands for the SaveHandle of a save whose background copy is still running."""

    def __init__(self, staged: bool = False) -> None:
        self.staged = staged

    def wait_staged(self, timeout: float | None = None) -> bool:
        return self.staged


def model_and_opt(seed: int = 0, cls: type = torch.optim.AdamW) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    return model, cls(model.parameters(), lr=0.1)


def closure_for(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, calls: list[str]):
    def closure() -> torch.Tensor:
        calls.append("closure")
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    return closure


def test_a_save_finds_the_live_optimizer_behind_its_state_dict():
    optimizers.watch()
    model, opt = model_and_opt()
    other, other_opt = model_and_opt(1)
    for m, o in ((model, opt), (other, other_opt)):
        m(torch.randn(4, 8)).sum().backward()
        o.step()
    states = [opt.state_dict(), other_opt.state_dict(), {"state": {}, "param_groups": []}]
    assert optimizers.live(states)[:2] == [opt, other_opt]
    assert optimizers.live(states)[2] is states[2]  # not an optimizer's own: stored as given
    copied = clone_state(opt.state_dict())  # same values, other tensors: not the live optimizer's
    assert optimizers.live([copied])[0] is copied


def test_first_step_after_a_save_runs_the_closure_before_waiting_and_matches_a_plain_step():
    optimizers.watch()
    x = torch.randn(16, 8)
    model, opt = model_and_opt()
    twin, twin_opt = model_and_opt()
    order: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: order.append("step pre-hook (the guard waits here)"))
    torch.manual_seed(5)
    optimizers.guarding([opt], Copying())  # type: ignore[arg-type]
    loss = opt.step(closure=closure_for(model, opt, x, order))
    torch.manual_seed(5)
    twin_loss = twin_opt.step(closure=closure_for(twin, twin_opt, x, []))
    # the closure ran in the global pre-hook, before the optimizer's own hooks, exactly once
    assert order == ["closure", "step pre-hook (the guard waits here)"]
    assert torch.equal(loss, twin_loss)
    assert_same_state(clone_state(model.state_dict()), clone_state(twin.state_dict()))
    assert_same_state(clone_state(opt.state_dict()), clone_state(twin_opt.state_dict()))

    order.clear()  # only the first step after the save
    opt.step(closure=closure_for(model, opt, x, order))
    assert order == ["step pre-hook (the guard waits here)", "closure"]


def test_no_early_closure_once_the_copy_is_done_or_without_a_closure():
    optimizers.watch()
    x = torch.randn(16, 8)
    model, opt = model_and_opt()
    order: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: order.append("pre-hook"))
    optimizers.guarding([opt], Copying(staged=True))  # type: ignore[arg-type]
    opt.step(closure=closure_for(model, opt, x, order))
    assert order == ["pre-hook", "closure"]

    order.clear()
    optimizers.guarding([opt], Copying())  # type: ignore[arg-type]
    closure_for(model, opt, x, order)()  # manual optimization: backward first, step without a closure
    opt.step()
    assert order == ["closure", "pre-hook"]


def test_lbfgs_calls_the_real_closure_after_the_first_result():
    optimizers.watch()
    x = torch.randn(16, 8)
    model, opt = model_and_opt(cls=torch.optim.LBFGS)
    twin, twin_opt = model_and_opt(cls=torch.optim.LBFGS)
    calls: list[str] = []
    optimizers.guarding([opt], Copying())  # type: ignore[arg-type]
    torch.manual_seed(5)
    opt.step(closure=closure_for(model, opt, x, calls))
    twin_calls: list[str] = []
    torch.manual_seed(5)
    twin_opt.step(closure=closure_for(twin, twin_opt, x, twin_calls))
    assert len(calls) == len(twin_calls) > 1
    assert_same_state(clone_state(model.state_dict()), clone_state(twin.state_dict()))
