"""Live host state: KVM modules and parameters, KVM's supported CPUID, kernel knobs, MSRs.

Every reader returns ``None`` for what it cannot read; nothing is guessed.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path
from typing import Any

from .cpuid import Leaves
from .decode import decode_pmu
from .vendors import VENDORS

DEV_KVM = Path("/dev/kvm")
# Tests point both verdicts (this one and agent/native/lib/caps.c) at a crafted tree of /sys/module
# and /proc/sys/kernel files; unset on real hosts.
SYSROOT_ENV = "PMUFARM_SYSROOT"


def sysroot_path(path: str) -> Path:
    """``path`` (absolute, under /sys or /proc) below ``$PMUFARM_SYSROOT`` when that is set."""
    root = os.environ.get(SYSROOT_ENV)
    return Path(root + path) if root else Path(path)

# <linux/kvm.h>: KVMIO = 0xAE; KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, struct kvm_cpuid2)
# struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; }   (8 bytes)
# struct kvm_cpuid_entry2 { __u32 function, index, flags, eax, ebx, ecx, edx, padding[3]; } (40 bytes)
_IOC_READ_WRITE = 3
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_CREATE_IRQCHIP = 0xAE01, 0xAE41, 0xAE60   # _IO(KVMIO, nr)
KVM_GET_SUPPORTED_CPUID = (_IOC_READ_WRITE << 30) | (8 << 16) | (0xAE << 8) | 0x05
_ENTRY = struct.Struct("<7I12x")
_E2BIG = 7

MSR_IA32_PERF_CAPABILITIES = 0x345


def read_text(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def read_int(path: str | Path) -> int | None:
    text = read_text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def read_bool_param(path: str | Path) -> bool | None:
    """A module bool parameter (``Y``/``N``, ``1``/``0``) or ``None`` if absent/unreadable."""
    text = read_text(path)
    if text is None:
        return None
    if text.upper() in ("Y", "1"):
        return True
    if text.upper() in ("N", "0"):
        return False
    return None


def kvm_vendor_modules() -> list[str]:
    """Loaded KVM vendor modules (``kvm_intel``, ``kvm_amd``, ``kvm_pvm``...), sorted."""
    try:
        return sorted(p.name for p in sysroot_path("/sys/module").glob("kvm_*") if p.is_dir())
    except OSError:
        return []


def kvm_supported_cpuid(dev: str | Path = DEV_KVM) -> Leaves | None:
    """KVM_GET_SUPPORTED_CPUID on /dev/kvm (what a guest can be given), or ``None``."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        nent = 128
        while nent <= 4096:
            buf = bytearray(struct.pack("<II", nent, 0) + bytes(_ENTRY.size * nent))
            try:
                fcntl.ioctl(fd, KVM_GET_SUPPORTED_CPUID, buf, True)
            except OSError as exc:
                if exc.errno == _E2BIG:
                    nent *= 2
                    continue
                return None
            count = struct.unpack_from("<I", buf)[0]
            leaves: Leaves = {}
            for i in range(count):
                fn, idx, _flags, a, b, c, d = _ENTRY.unpack_from(buf, 8 + i * _ENTRY.size)
                leaves[(fn, idx)] = (a, b, c, d)
            return leaves
        return None
    finally:
        os.close(fd)


def supported_pmu(leaves: Leaves | None, vendor: str, enable_pmu: bool | None) -> dict[str, Any] | None:
    """The ``pmu``-shaped view of KVM's supported CPUID.

    With ``kvm.enable_pmu=N`` KVM gives guests no PMU at all (kvm_pmu_refresh() returns before
    setting a version), which CPUID alone cannot say on AMD (legacy counters have no CPUID bit),
    so the counters are zeroed then.
    """
    if leaves is None:
        return None
    pmu = decode_pmu(leaves, vendor, amd_legacy_counters=4)
    if enable_pmu is False:
        pmu.update(version=0, gp_counters=0, gp_width=0, fixed_counters=0, fixed_width=0, arch_events=[],
                   fixed_counters_mask=0)
        v = VENDORS.get(vendor)
        if v is not None:
            pmu.update(dict.fromkeys(v.zero_without_kvm_pmu, 0))
    return pmu


def perf_core_pmu_registered() -> bool | None:
    """Did the host kernel's perf register a core PMU (``cpu``, or ``cpu_core``/``cpu_atom`` on
    hybrid parts)? perf probes the counters (check_hw_exists()) and registers none when they do not
    work, e.g. "PMU not available due to virtualization". ``None`` if sysfs is unreadable."""
    base = Path("/sys/bus/event_source/devices")
    if not base.is_dir():
        return None
    return any((base / name).exists() for name in ("cpu", "cpu_core", "cpu_atom"))


def read_msr(msr: int, cpu: int = 0) -> int | None:
    """An MSR through /dev/cpu/N/msr (needs the msr driver and root), or ``None``."""
    try:
        fd = os.open(f"/dev/cpu/{cpu}/msr", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, 8, msr)
        return struct.unpack("<Q", data)[0] if len(data) == 8 else None
    except OSError:
        return None
    finally:
        os.close(fd)


def mediated_vcpu_errno(dev: str | Path = DEV_KVM) -> int | None:
    """Create a VM with an in-kernel irqchip and one vCPU, as every probe does: 0, or the errno of
    KVM_CREATE_VCPU (EBUSY while a host perf event without exclude_guest exists: x86.c
    kvm_arch_vcpu_precreate() -> perf_create_mediated_pmu()). ``None`` when the VM or irqchip
    cannot even be made (then /dev/kvm's own facts say why)."""
    try:
        kvm = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    vm = vcpu = -1
    try:
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
    except OSError:
        return None
    else:
        try:
            vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        except OSError as exc:
            return exc.errno
        return 0
    finally:
        for fd in (vcpu, vm, kvm):
            if fd >= 0:
                os.close(fd)


def kvm_state(vendor: str, kvm_device: str | Path = DEV_KVM) -> dict[str, Any]:
    """The ``kvm`` part of the facts.

    ``module`` is the vendor module for this CPU when loaded, else the first other loaded KVM
    vendor module (e.g. ``kvm_pvm``), else ``None``; ``vendor_modules`` lists them all.
    ``enable_mediated_pmu`` is that module's parameter, ``None`` when it does not expose one
    (no such module, or a kernel older than Linux 7.0). ``ignore_msrs`` is kvm's parameter.
    ``mediated_vcpu_errno``: a trial vCPU's creation (see mediated_vcpu_errno()), made only when
    the parameter reads Y, since only then can perf refuse it; ``None`` otherwise.
    """
    modules = kvm_vendor_modules()
    v = VENDORS.get(vendor)
    want = v.kvm_module if v else None
    module = want if want in modules else (modules[0] if modules else None)
    present = Path(kvm_device).exists()
    enable_pmu = read_bool_param(sysroot_path("/sys/module/kvm/parameters/enable_pmu"))
    mediated = read_bool_param(sysroot_path(f"/sys/module/{module}/parameters/enable_mediated_pmu")) \
        if module else None
    leaves = kvm_supported_cpuid(kvm_device) if present else None
    return {
        "present": present,
        "module": module,
        "vendor_modules": modules,
        "enable_pmu": enable_pmu,
        "enable_mediated_pmu": mediated,
        "ignore_msrs": read_bool_param(sysroot_path("/sys/module/kvm/parameters/ignore_msrs")),
        "mediated_vcpu_errno": mediated_vcpu_errno(kvm_device) if present and mediated else None,
        "supported_pmu": supported_pmu(leaves, vendor, enable_pmu),
    }


def unknown_kvm_state() -> dict[str, Any]:
    """``kvm`` part when the facts do not come from a live host (CPUID dump)."""
    return {"present": None, "module": None, "vendor_modules": None, "enable_pmu": None,
            "enable_mediated_pmu": None, "ignore_msrs": None, "mediated_vcpu_errno": None,
            "supported_pmu": None}


def kernel_state() -> dict[str, Any]:
    return {
        "release": os.uname().release,
        "cmdline": read_text("/proc/cmdline"),
        "nmi_watchdog": read_int(sysroot_path("/proc/sys/kernel/nmi_watchdog")),
        "perf_event_paranoid": read_int(sysroot_path("/proc/sys/kernel/perf_event_paranoid")),
    }


def unknown_kernel_state() -> dict[str, Any]:
    return {"release": None, "cmdline": None, "nmi_watchdog": None, "perf_event_paranoid": None}


def cpuinfo_first_cpu(path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """``key: value`` pairs of the first processor block of /proc/cpuinfo."""
    text = read_text(path) or ""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if out:
                break
            continue
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
    return out
