"""Run a command as a container runtime's `RuntimeDefault` would: the runtime's default seccomp
profile (Docker/containerd or CRI-O format), resolved for x86-64 and a capability set the way
the runtimes resolve it, loaded with libseccomp (as runc and crun do), with no_new_privs (as
`allowPrivilegeEscalation: false` asks), then the capability bounding set reduced to the
container's and the command executed.

    runtime_default.py --profile FILE --profile-caps CAP_A,CAP_B --caps a,b -- CMD ARGS...

`--profile-caps` are the capabilities the profile is resolved for (a rule with `includes.caps`
needs all of them, one with `excludes.caps` is dropped if any is held); `--caps` are the
capabilities the command keeps (setpriv's names). They differ only in a negative control.
Needs Debian's python3-seccomp (libseccomp's own bindings) and util-linux's setpriv.
"""

import argparse
import errno
import json
import os
import platform
import sys

import seccomp

ARCH = "amd64"  # the profiles' name for x86-64

OPS = {
    "SCMP_CMP_NE": seccomp.NE,
    "SCMP_CMP_LT": seccomp.LT,
    "SCMP_CMP_LE": seccomp.LE,
    "SCMP_CMP_EQ": seccomp.EQ,
    "SCMP_CMP_GE": seccomp.GE,
    "SCMP_CMP_GT": seccomp.GT,
    "SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ,
}


def kernel_at_least(version):
    """Whether the running kernel is at least `version` ("4.8")."""
    have = [int(p) for p in platform.release().split("-")[0].split(".")[:2]]
    want = [int(p) for p in version.split(".")[:2]]
    return have >= want


def applies(rule, caps):
    """The runtimes' selection of a rule for an architecture and a capability set."""
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if ARCH in (exc.get("arches") or []):
        return False
    if any(c in caps for c in exc.get("caps") or []):
        return False
    if exc.get("minKernel") and kernel_at_least(exc["minKernel"]):
        return False
    if inc.get("arches") and ARCH not in inc["arches"]:
        return False
    if any(c not in caps for c in inc.get("caps") or []):
        return False
    if inc.get("minKernel") and not kernel_at_least(inc["minKernel"]):
        return False
    return True


def action(name, errno_ret, default_errno):
    if name == "SCMP_ACT_ALLOW":
        return seccomp.ALLOW
    if name == "SCMP_ACT_ERRNO":
        return seccomp.ERRNO(errno_ret if errno_ret is not None else default_errno)
    if name == "SCMP_ACT_LOG":
        return seccomp.LOG
    if name in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"):
        return seccomp.KILL
    if name == "SCMP_ACT_KILL_PROCESS":
        return seccomp.KILL_PROCESS
    raise SystemExit(f"unsupported action {name}")


def build(profile, caps):
    default_errno = profile.get("defaultErrnoRet", errno.EPERM)
    filt = seccomp.SyscallFilter(action(profile["defaultAction"], default_errno, default_errno))
    allowed = 0
    for rule in profile["syscalls"]:
        if not applies(rule, caps):
            continue
        act = action(rule["action"], rule.get("errnoRet"), default_errno)
        args = [
            seccomp.Arg(a["index"], OPS[a["op"]], a["value"], a.get("valueTwo", 0))
            for a in rule.get("args") or []
        ]
        for name in rule.get("names") or [rule.get("name")]:
            try:
                filt.add_rule(act, name, *args)
            except (RuntimeError, ValueError):
                # Not a system call of this architecture (the profiles list every one's).
                continue
            if act == seccomp.ALLOW:
                allowed += 1
    return filt, allowed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", required=True)
    parser.add_argument("--profile-caps", required=True)
    parser.add_argument("--caps", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    opts = parser.parse_args()
    command = opts.command[1:] if opts.command[:1] == ["--"] else opts.command
    with open(opts.profile, encoding="utf-8") as f:
        profile = json.load(f)
    caps = {c for c in opts.profile_caps.split(",") if c}
    filt, allowed = build(profile, caps)
    print(f"runtime_default: {opts.profile}: {allowed} allow rules for {sorted(caps)}", file=sys.stderr)
    # libseccomp sets no_new_privs when it loads the filter (its default), as runc does for
    # allowPrivilegeEscalation: false.
    filt.load()
    keep = ",".join("+" + c for c in opts.caps.split(",") if c)
    os.execv(
        "/usr/bin/setpriv",
        [
            "setpriv",
            f"--bounding-set=-all,{keep}" if keep else "--bounding-set=-all",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--",
            *command,
        ],
    )


if __name__ == "__main__":
    main()
