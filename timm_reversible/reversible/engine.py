""" The reversible engine: a stack of invertible steps whose backward stores no per-step activations.

The forward runs every step under no_grad and keeps only the final state and each step's side
information (RNG snapshots, packed bits, random signs). The backward walks the steps in reverse: each
step reconstructs its input from its output and backpropagates the incoming gradient through a
recomputation of its residual functions on that input, then frees their graph before the next step,
so at most one step's graph is alive at any moment.

The engine knows nothing of any model. A step is an object with `forward(state, tape)` and
`inverse(state, tape)`; it evaluates its residual functions through the tape (`tape.run`), draws any
other randomness through it (`tape.draw`) and keeps side information with `tape.save` / `tape.load`,
so that the tape can replay all of it exactly. From those two methods the engine derives the
backward: reconstruct with `inverse`, recompute `forward` with grad under the tape's replay,
backpropagate. A step may override `backward` with a leaner fused form; it may then update `state`
and `grads` in place: they are buffers owned by the engine.
"""
import contextlib
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import record_function

__all__ = [
    'State', 'Tape', 'ReplayTape', 'ReversibleStep', 'ReconstructionError', 'reversible_forward', 'plain_forward',
    'reconstruct',
]

State = Tuple[torch.Tensor, ...]
ResidualFn = Callable[[torch.Tensor], torch.Tensor]


class Tape:
    """ A step's record of its forward pass. This base form serves ordinary autograd: functions run
    directly, random draws are made directly and nothing is kept.
    """
    replaying = False

    def run(self, name: str, fn: ResidualFn, x: torch.Tensor) -> torch.Tensor:
        """ Evaluate a residual function; `name` identifies its randomness within the step. """
        return fn(x)

    def draw(self, name: str, sample: Callable[[], torch.Tensor]) -> torch.Tensor:
        """ Randomness a step draws outside its residual functions (e.g. random signs): the same value
        again whenever the step is replayed.
        """
        return sample()

    def save(self, name: str, make_value: Callable[[], Any]) -> None:
        """ Keep side information for the backward; `make_value` is called only where it is kept. """

    def load(self, name: str) -> Any:
        raise RuntimeError('side information is kept only by the reversible engine')


_SDPA_BACKENDS = {
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
    SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
}


class _KernelSettings:
    """ What chooses the kernels of the forward, to re-enter when recomputing: its autocast settings and the
    scaled-dot-product-attention backends it allowed (a forward under `sdpa_kernel(...)` is recomputed with the
    same backends, though the backward runs outside that context).
    """

    def __init__(self, device_type: str):
        # devices without autocast (meta) have nothing to re-enter
        self.device_types = {d for d in (device_type, 'cpu') if torch.amp.is_autocast_available(d)}
        self.autocast = {
            d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in self.device_types}
        self.cache_enabled = torch.is_autocast_cache_enabled()
        self.sdpa_backends = [backend for backend, enabled in _SDPA_BACKENDS.items() if enabled()]

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for d, (enabled, dtype) in self.autocast.items():
                stack.enter_context(
                    torch.autocast(d, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled))
            stack.enter_context(sdpa_kernel(self.sdpa_backends))
            yield


class _RngState:
    """ Snapshot of the CPU generator and the state device's generator (as torch.utils.checkpoint does). """

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda_device = device if device.type == 'cuda' else None
        self.cuda = torch.cuda.get_rng_state(device) if self.cuda_device is not None else None

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """ Set the snapshot for the duration of the block; the caller's streams are left where they were. """
        with record_function('reversible.rng'):
            caller = _RngState(self.cuda_device or torch.device('cpu'))
            self._set()
        try:
            yield
        finally:
            with record_function('reversible.rng'):
                caller._set()

    def _set(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda_device is not None:
            torch.cuda.set_rng_state(self.cuda, self.cuda_device)


class ReplayTape(Tape):
    """ The engine's tape: records RNG snapshots, draws and side information in the forward, replays them after. """

    def __init__(self, device: torch.device, kernels: _KernelSettings):
        self.device = device
        self.kernels = kernels
        self.rng: Dict[str, _RngState] = {}
        self.side: Dict[str, Any] = {}

    def run(self, name: str, fn: ResidualFn, x: torch.Tensor) -> torch.Tensor:
        if not self.replaying:
            with record_function('reversible.rng'):
                self.rng[name] = _RngState(self.device)
            return fn(x)
        with self.replay(name):
            return fn(x)

    def draw(self, name: str, sample: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self.replaying:
            self.side[name] = sample()
        return self.side[name]

    @contextlib.contextmanager
    def replay(self, name: str) -> Iterator[None]:
        """ Re-enter the forward's RNG state at `name` and its kernel settings (autocast, attention backends). """
        with self.rng[name].restored(), self.kernels.enter():
            yield

    def vjp(
            self,
            name: str,
            fn: ResidualFn,
            x: torch.Tensor,
            grad_output: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """ Recompute `fn(x)` with grad, backpropagate `grad_output` (parameter grads accumulate in
        place) and free the graph. Returns the recomputed output, detached, and the gradient wrt x.
        """
        with record_function('reversible.recompute'):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad(), self.replay(name):
                y = fn(x)
            # outside autocast: the backward runs in the dtypes the forward recorded
            torch.autograd.backward(y, grad_output.to(y.dtype))
            return y.detach(), x.grad

    def save(self, name: str, make_value: Callable[[], Any]) -> None:
        if not self.replaying:
            self.side[name] = make_value()

    def load(self, name: str) -> Any:
        return self.side[name]


class ReversibleStep:
    """ One invertible step of a reversible stack (a coupling or integrator); model-specific.

    A step implements `forward` and `inverse`; `backward` has a default derived from them. `verified_inputs`
    names the parts of its input state that its backward reconstructs bit for bit through a recomputation: the
    engine can check them against a fingerprint kept in the forward.
    """
    verified_inputs: Tuple[int, ...] = ()

    def forward(self, state: State, tape: Tape) -> State:
        """ The step; runs under no_grad in the engine and with grad for ordinary autograd. """
        raise NotImplementedError

    def inverse(self, state: State, tape: Tape) -> State:
        """ The step's input from its output, under no_grad. """
        raise NotImplementedError

    def backward(self, state: State, grads: State, tape: ReplayTape) -> Tuple[State, State]:
        """ (output, grad of output) -> (input, grad of input): reconstruct the input with `inverse`, then
        backpropagate through `forward` recomputed on it with the forward's randomness.
        """
        with record_function('reversible.reconstruct'):
            inputs = self.inverse(state, tape)
        with record_function('reversible.recompute'):
            leaves = tuple(x.detach().requires_grad_(True) for x in inputs)
            with torch.enable_grad():
                outputs = self.forward(leaves, tape)
            pairs = [(y, g) for y, g in zip(outputs, grads) if y.requires_grad]
            torch.autograd.backward([y for y, _ in pairs], [g.to(y.dtype) for y, g in pairs])
        input_grads = tuple(
            leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves)
        return tuple(x.detach() for x in inputs), input_grads


def _owned_grads(grads: Sequence[Optional[torch.Tensor]], state: State) -> List[torch.Tensor]:
    """ Gradient buffers the steps may update in place: materialised, dense and unaliased. """
    owned: List[torch.Tensor] = []
    for g, s in zip(grads, state):
        if g is None:
            g = torch.zeros_like(s)
        elif (g._base is not None or not g.is_contiguous() or g.dtype != s.dtype
              or any(g.untyped_storage().data_ptr() == o.untyped_storage().data_ptr() for o in owned)):
            g = g.to(dtype=s.dtype, memory_format=torch.contiguous_format, copy=True)
        owned.append(g)
    return owned


class ReconstructionError(RuntimeError):
    """ The backward reconstructed a different input for an exact step than its forward saw. """


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _fingerprint(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """ Per sample, the sum and the sum of squares of each tensor's bit patterns (16 bytes per sample and tensor):
    any one changed value changes it. Integer sums do not depend on the order of summation, so a forward and a
    backward that lay out the same values differently agree.
    """
    sums = []
    for t in tensors:
        # + 0 turns -0.0 into 0.0: equal values, whatever the sign of a zero the arithmetic produced
        bits = (t.detach() + 0).view(_BITS[t.dtype]).reshape(t.shape[0], math.prod(t.shape[1:])).to(torch.int64)
        sums.append(torch.stack([bits.sum(dim=1), (bits * bits).sum(dim=1)]))
    return torch.stack(sums)


def _raise_on_mismatch(checks: List[Tuple[int, torch.Tensor]]) -> None:
    """ One device sync for the whole backward; the first step in backward order is where it went wrong. """
    if not checks:
        return
    mismatched = torch.stack([bad for _, bad in checks])
    if not bool(mismatched.any()):
        return
    step = checks[int(mismatched.nonzero()[0, 0])][0]
    raise ReconstructionError(
        f'The reversible backward reconstructed another input for step {step} (block {step}) than its forward '
        f'computed: recomputing the block with grad enabled did not run bit for bit the same arithmetic as the '
        f'forward without grad, so the gradients would be wrong. Likely causes on a GPU: a cuBLAS / cuDNN '
        f'algorithm chosen differently, another scaled-dot-product-attention backend when inputs require grad, '
        f'or dropout inside a fused attention kernel. Remedies: torch.use_deterministic_algorithms(True) with '
        f'CUBLAS_WORKSPACE_CONFIG=:4096:8; pin one attention backend for both passes '
        f'(torch.nn.attention.sdpa_kernel); or model.set_reversible(False) (ordinary autograd, more memory). '
        f'`python -m timm_reversible.selfcheck` checks a machine.')


class _ReversibleFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, steps: Sequence[ReversibleStep], tapes: List[ReplayTape], verify: bool,
                anchor: torch.Tensor, *state: torch.Tensor) -> State:
        fingerprints: List[Optional[torch.Tensor]] = []
        with record_function('reversible.forward'):
            for step, tape in zip(steps, tapes):
                verified = [state[i] for i in step.verified_inputs] if verify else []
                fingerprints.append(_fingerprint(verified) if verified else None)
                state = step.forward(state, tape)
        ctx.steps, ctx.tapes, ctx.fingerprints = steps, tapes, fingerprints
        ctx.save_for_backward(*state)
        return tuple(state)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
        with record_function('reversible.backward'):
            state = tuple(t.detach() for t in ctx.saved_tensors)
            grads = tuple(_owned_grads(grads, state))
            steps, tapes, fingerprints = ctx.steps, ctx.tapes, ctx.fingerprints
            checks: List[Tuple[int, torch.Tensor]] = []
            with torch.no_grad():
                for i in reversed(range(len(steps))):
                    tape = tapes.pop()
                    tape.replaying = True
                    state, grads = steps[i].backward(state, grads, tape)
                    expected = fingerprints.pop()
                    if expected is not None:
                        reconstructed = _fingerprint([state[j] for j in steps[i].verified_inputs])
                        checks.append((i, (reconstructed != expected).any()))
            _raise_on_mismatch(checks)
        return (None, None, None, None) + tuple(grads)


def _new_tapes(steps: Sequence[ReversibleStep], state: State) -> List[ReplayTape]:
    kernels = _KernelSettings(state[0].device.type)
    return [ReplayTape(state[0].device, kernels) for _ in steps]


def reversible_forward(steps: Sequence[ReversibleStep], state: State, verify: bool = True) -> State:
    """ Run the steps, storing only the final state and side information for the backward.

    With `verify`, each step keeps a fingerprint of its `verified_inputs` (16 bytes per sample and tensor) and the
    backward raises `ReconstructionError` if it reconstructs anything else. Gradients of the steps' parameters are
    accumulated into `.grad` by the backward (as reentrant checkpointing does), so use `loss.backward()`, not
    `torch.autograd.grad`, through this function.
    """
    # an input that requires grad keeps the function in the graph even when the state does not
    anchor = torch.empty(0, requires_grad=True)
    return _ReversibleFunction.apply(steps, _new_tapes(steps, state), verify, anchor, *state)


def plain_forward(steps: Sequence[ReversibleStep], state: State) -> State:
    """ The same steps under ordinary autograd (activations stored as usual). """
    tape = Tape()
    for step in steps:
        state = step.forward(state, tape)
    return state


@torch.no_grad()
def reconstruct(steps: Sequence[ReversibleStep], state: State) -> Tuple[List[State], List[State]]:
    """ The input state of every step as the forward computed it, and as the inverses reconstruct it. """
    tapes = _new_tapes(steps, state)
    inputs = []
    for step, tape in zip(steps, tapes):
        inputs.append(state)
        state = step.forward(state, tape)
    reconstructed = []
    for step, tape in zip(reversed(steps), reversed(tapes)):
        tape.replaying = True
        state = step.inverse(state, tape)
        reconstructed.append(state)
    return inputs, reconstructed[::-1]
