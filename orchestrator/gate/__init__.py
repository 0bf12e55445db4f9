"""``orchestrator gate``: test a kernel patch series against its base and give CI a verdict.

Modules, in pipeline order:

* ``series``    -- intake of every form (mbox, patch files, format-patch directory, Message-ID via b4,
                   git range), patch subjects, KCIDB patchset hash, base-commit;
* ``apply``     -- git worktree at the base + ``git am --3way``; apply-failed names the patch;
* ``build``     -- the configurable build command with a timeout; the simulated-kernel map;
* ``provision`` -- none / kexec / reboot for real hosts; kernel -> injected faults for simulated ones;
* ``baseline``  -- host classes and reuse of stored baseline runs;
* ``verdict``   -- comparison, flake and known-issue handling, gate.md / gate.json;
* ``bisect``    -- on a regression, the first bad patch (failing tests only, hosts that failed);
* ``run``       -- the pipeline; ``command`` -- the click command.

Exit status: 0 pass, 1 regression, 2 input / apply / build error, 3 inconclusive (infrastructure).
"""

from orchestrator.gate.command import gate

__all__ = ["gate"]
