"""Our sampler names <-> AUTOMATIC1111's, in one place: the PNG `parameters` chunk
(runtime/imaging/png_info.py) and an A1111-compatible server (`/sdapi/v1/samplers`, `sampler_name`) use it.

A1111 names (display name, aliases) come from its modules/sd_samplers_kdiffusion.py,
sd_samplers_timesteps.py and sd_samplers_lcm.py (v1.10). Since v1.9 A1111 writes the sigma schedule
in its own field, "Sampler: DPM++ 2M, Schedule type: Karras"; before, the schedule was part of the
name, "Sampler: DPM++ 2M Karras". Both are read: a schedule label at the end of the name wins
(as A1111's `get_sampler_and_scheduler`), then the "Schedule type" field. "Automatic" means the
sampler's own default, which for DPM++ 2M is Karras since v1.9; with no schedule at all (infotexts
before v1.9) the name alone decides, and "DPM++ 2M" meant uniform sigmas.

We write the v1.9+ form: the display name and "Karras" for Karras sigmas; otherwise "Automatic",
or "Uniform" where A1111's Automatic would mean Karras. A1111's timestep samplers (DDIM, PLMS,
UniPC) ignore the schedule; we still write ours. The names say which algorithm ran, not that A1111
would draw the same image: its step spacing and its torch random numbers differ from ours.

    ddim DDIM | ddpm DDPM (Forge's name; A1111 has none) | pndm PLMS | lms LMS | euler Euler |
    euler_a Euler a | heun Heun | dpmpp_2m, dpmpp_2m_karras DPM++ 2M | unipc UniPC | lcm LCM |
    tcd TCD (the A1111 extension licyk/sd-webui-tcd-sampler's name; A1111 has none)
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.scheduler import REGISTRY

__all__ = ["A1111_SAMPLERS", "A1111_SCHEDULES", "A1111Sampler", "SPACING_SCHEDULES", "SamplerNameError", "from_a1111",
           "sampler_names", "spacing_from_a1111", "to_a1111"]


class SamplerNameError(ValueError):
    """An A1111 sampler or schedule that has no counterpart here."""


@dataclass(frozen=True)
class A1111Sampler:
    name: str  # A1111's display name
    ours: str  # our sampler (runtime/scheduler.py SAMPLERS)
    aliases: tuple[str, ...] = ()  # A1111's aliases (its API accepts them as sampler_name)
    karras_default: bool = False  # A1111 (v1.9+) options {'scheduler': 'karras'}: "Automatic" = Karras
    timesteps: bool = False  # A1111 runs it on its own timesteps: no schedule (DDIM, PLMS, UniPC)


# One row per sampler of ours that A1111 has, from its registry record (runtime/scheduler.py REGISTRY).
A1111_SAMPLERS: tuple[A1111Sampler, ...] = tuple(
    A1111Sampler(r.a1111[0], r.name, r.a1111[1:], r.a1111_karras_default, r.a1111_timesteps)
    for r in REGISTRY.values() if r.a1111)
# Old-style names with the schedule built in, and their aliases (A1111 before v1.9).
_LEGACY_ALIASES = {"k_lms_ka": "LMS Karras", "k_dpmpp_2m_ka": "DPM++ 2M Karras"}
# A1111 modules/sd_schedulers.py (v1.10): schedule label -> its internal name.
A1111_SCHEDULES = {"Automatic": "automatic", "Uniform": "uniform", "Karras": "karras", "Exponential": "exponential",
                   "Polyexponential": "polyexponential", "SGM Uniform": "sgm_uniform", "KL Optimal": "kl_optimal",
                   "Align Your Steps": "align_your_steps", "Simple": "simple", "Normal": "normal", "DDIM": "ddim",
                   "Beta": "beta",
                   # Forge's (lllyasviel/stable-diffusion-webui-forge modules/sd_schedulers.py `turbo_scheduler`)
                   "Turbo": "turbo"}

# A1111 schedule types that are a timestep spacing here (the folder's scheduler config's, replaced for
# the request): A1111 modules/sd_schedulers.py (v1.10) `sgm_uniform` takes n timesteps evenly from
# sigma_to_t(sigma_max) = 999 down, the last of n + 1 dropped, then sigma 0: 999 - i * 999 / n, which
# diffusers' scheduler overview (docs/source/en/api/schedulers/overview.md, "sgm_uniform: init with
# timestep_spacing='trailing'") maps to timestep_spacing "trailing": 1000 - i * 1000 / n, rounded, - 1
# (equal at i = 0, within a timestep after). Turbo / Lightning / Hyper-SD models are trained on it.
# Forge's "Turbo" schedule, timesteps round(k * 1000 / n - 1) for k = n..1, is "trailing" exactly.
SPACING_SCHEDULES = {"SGM Uniform": "trailing", "Turbo": "trailing"}


def sampler_names() -> list[str]:
    """A1111 display names of the samplers we run, for `/sdapi/v1/samplers`."""
    return [s.name for s in A1111_SAMPLERS]


def to_a1111(sampler: str, karras: bool) -> tuple[str, str]:
    """(Sampler, Schedule type) for our `sampler` run with (`karras`) or without Karras sigmas."""
    ours = "dpmpp_2m" if sampler == "dpmpp_2m_karras" else sampler
    row = next((s for s in A1111_SAMPLERS if s.ours == ours), None)
    if row is None:
        raise SamplerNameError(f"no A1111 name for sampler {sampler!r}; known: "
                               f"{', '.join(s.ours for s in A1111_SAMPLERS)}, dpmpp_2m_karras")
    if karras or sampler == "dpmpp_2m_karras":
        return row.name, "Karras"
    return row.name, "Uniform" if row.karras_default else "Automatic"


def from_a1111(name: str, schedule_type: str | None = None) -> tuple[str, bool]:
    """(our sampler, karras) for an A1111 sampler name (display name or alias, possibly with a
    schedule suffix such as "DPM++ 2M Karras") and its "Schedule type" field (None if absent)."""
    full = _LEGACY_ALIASES.get(name.strip(), name.strip())
    base, suffix = _split_schedule(full)
    row = next((s for s in A1111_SAMPLERS if base == s.name or base in s.aliases), None)
    if row is None:
        raise SamplerNameError(f"A1111 sampler {name!r} has no counterpart here; supported: "
                               f"{', '.join(sampler_names())} (optionally with ' Karras')")
    schedule = suffix or (schedule_type.strip() if schedule_type else None)
    if schedule is not None and schedule not in A1111_SCHEDULES:
        schedule = next((label for label, key in A1111_SCHEDULES.items() if key == schedule), schedule)
    if schedule == "Karras":
        # A1111's timestep samplers ignore it; of ours, only unipc among them can use it
        return row.ours, not row.timesteps or row.ours == "unipc"
    if schedule in (None, "Uniform", *SPACING_SCHEDULES) or row.timesteps:
        return row.ours, False
    if schedule == "Automatic":
        return row.ours, row.karras_default
    raise SamplerNameError(f"A1111 schedule type {schedule!r} (sampler {name!r}) is not implemented here; "
                           f"supported: Automatic, Uniform, Karras, {', '.join(SPACING_SCHEDULES)}")


def spacing_from_a1111(name: str, schedule_type: str | None = None) -> str | None:
    """The timestep spacing an A1111 sampler name and schedule type ask for ("trailing" for SGM
    Uniform), or None: the folder's. A1111's timestep samplers (DDIM, PLMS, UniPC) ignore the
    schedule, so None for them. Names are checked by `from_a1111`."""
    base, suffix = _split_schedule(_LEGACY_ALIASES.get(name.strip(), name.strip()))
    row = next((s for s in A1111_SAMPLERS if base == s.name or base in s.aliases), None)
    schedule = suffix or (schedule_type.strip() if schedule_type else None)
    if schedule is not None and schedule not in A1111_SCHEDULES:
        schedule = next((label for label, key in A1111_SCHEDULES.items() if key == schedule), schedule)
    return None if row is None or row.timesteps else SPACING_SCHEDULES.get(schedule)


def _split_schedule(name: str) -> tuple[str, str | None]:
    """'DPM++ 2M Karras' -> ('DPM++ 2M', 'Karras'): A1111's suffix rule (label or internal name)."""
    options = sorted(((o, label) for label, key in A1111_SCHEDULES.items() for o in (label, key)),
                     key=lambda x: -len(x[0]))  # the longest first: "SGM Uniform" before "Uniform"
    for option, label in options:
        if name.endswith(" " + option):
            return name[:-len(option) - 1], label
    return name, None
