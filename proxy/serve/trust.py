"""``pyproxy trust`` / ``pyproxy untrust``: install the local CA's root where browsers and tools look.

Two kinds of places, each one a step that says what it did or why it skipped:
  * the system store: Debian/Ubuntu (/usr/local/share/ca-certificates + update-ca-certificates),
    Fedora/RHEL (``trust anchor``), macOS (``security add-trusted-cert``). It needs root: when we are
    not root, commands go through ``sudo``, with ``-n`` (never a password prompt) unless stdin is a TTY.
    ``system_store`` overrides it: "skip" leaves it alone, a directory gets a copy of the root and no
    command runs (for tests and for packaging).
  * NSS databases, with ``certutil`` (libnss3-tools): Chromium's ~/.pki/nssdb (created when missing,
    as Chromium would) and every Firefox profile found under the home directory.

Steps are planned first (``plan``) and then run (``run_steps``), so ``--dry-run`` prints exactly what
would run.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

SYSTEM_STORE_SKIP = "skip"
DEBIAN_ANCHORS = "/usr/local/share/ca-certificates"
MACOS_KEYCHAIN = "/Library/Keychains/System.keychain"
CERTUTIL_MISSING = ("certutil not found: apt-get install libnss3-tools (Fedora: dnf install nss-tools), "
                    "then run `pyproxy {verb}` again")
COMMAND_TIMEOUT = 60.0
TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")  # update-ca-certificates lives in sbin, often off PATH


@dataclass
class Step:
    """One place the root goes into (or comes out of): a description and what to do there."""
    place: str
    commands: list[list[str]] = field(default_factory=list)
    copy: tuple[str, str] | None = None     # (source, destination), done before the commands
    remove: str | None = None               # a file to delete, before the commands
    skipped: str | None = None              # why nothing is done here
    missing_ok: bool = False                # untrust: a certificate not found there is not a failure


@dataclass(frozen=True)
class Root:
    path: str
    fingerprint: str

    @property
    def nickname(self) -> str:
        """The name under which the root is filed in NSS databases and the system store."""
        return f"pyproxy local CA {self.fingerprint[:12]}"

    @property
    def file_name(self) -> str:
        return f"pyproxy-local-ca-{self.fingerprint[:12]}.crt"


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(TOOL_DIRS))


def plan(root: Root, install: bool, home: str, system_store: str | None) -> list[Step]:
    return [system_step(root, install, system_store), *nss_steps(root, install, home)]


# -- the system store ---------------------------------------------------------------------------

def system_step(root: Root, install: bool, system_store: str | None) -> Step:
    if system_store == SYSTEM_STORE_SKIP:
        return Step("system store", skipped=f"skipped (system store set to {SYSTEM_STORE_SKIP!r})")
    if system_store:
        destination = os.path.join(system_store, root.file_name)
        if install:
            return Step(f"system store {system_store}", copy=(root.path, destination))
        return Step(f"system store {system_store}", remove=destination)
    if sys.platform == "darwin":
        return _privileged(_macos_step(root, install))
    if os.path.isdir(DEBIAN_ANCHORS) and find_tool("update-ca-certificates"):
        return _privileged(_debian_step(root, install))
    if find_tool("trust"):
        verb = "--store" if install else "--remove"
        return _privileged(Step("system store (p11-kit trust)", [[find_tool("trust"), "anchor", verb, root.path]]))
    return Step("system store", skipped="skipped: no known system store here (Debian/Ubuntu, Fedora/RHEL, macOS)")


def _debian_step(root: Root, install: bool) -> Step:
    destination = os.path.join(DEBIAN_ANCHORS, root.file_name)
    update = [find_tool("update-ca-certificates")]
    if install:
        return Step(f"system store ({DEBIAN_ANCHORS})", [["install", "-m", "0644", root.path, destination], update])
    return Step(f"system store ({DEBIAN_ANCHORS})", [["rm", "-f", destination], update + ["--fresh"]])


def _macos_step(root: Root, install: bool) -> Step:
    if install:
        command = ["security", "add-trusted-cert", "-d", "-r", "trustRoot", "-k", MACOS_KEYCHAIN, root.path]
    else:
        command = ["security", "remove-trusted-cert", "-d", root.path]
    return Step("system store (macOS System keychain)", [command])


def _privileged(step: Step) -> Step:
    """Run the commands as root: directly when we are root, else through sudo, which may only ask
    for a password when a person is at a terminal."""
    if os.geteuid() == 0:
        return step
    if not shutil.which("sudo"):
        return Step(step.place, skipped="skipped: needs root and sudo is not installed; run `pyproxy trust` as root")
    prefix = ["sudo"] if sys.stdin.isatty() else ["sudo", "-n"]
    step.commands = [prefix + command for command in step.commands]
    return step


# -- NSS databases (Chromium, Firefox) ----------------------------------------------------------

def nss_databases(home: str) -> list[tuple[str, str]]:
    """(label, "sql:DIR" or "dbm:DIR") for Chromium's database and each Firefox profile's."""
    found = [("Chromium", "sql:" + os.path.join(home, ".pki", "nssdb"))]
    patterns = [os.path.join(home, ".mozilla", "firefox", "*"),
                os.path.join(home, "snap", "firefox", "common", ".mozilla", "firefox", "*")]
    for pattern in patterns:
        for profile in sorted(glob.glob(pattern)):
            if os.path.isfile(os.path.join(profile, "cert9.db")):
                found.append((f"Firefox profile {os.path.basename(profile)}", "sql:" + profile))
            elif os.path.isfile(os.path.join(profile, "cert8.db")):
                found.append((f"Firefox profile {os.path.basename(profile)}", "dbm:" + profile))
    return found


def nss_steps(root: Root, install: bool, home: str) -> list[Step]:
    certutil = find_tool("certutil")
    if certutil is None:
        verb = "trust" if install else "untrust"
        return [Step("NSS databases (Chromium, Firefox)", skipped=CERTUTIL_MISSING.format(verb=verb))]
    steps = []
    for label, database in nss_databases(home):
        directory = database.split(":", 1)[1]
        place = f"{label} ({directory})"
        exists = os.path.isfile(os.path.join(directory, "cert9.db")) or os.path.isfile(os.path.join(directory, "cert8.db"))
        if not install:
            if not exists:
                steps.append(Step(place, skipped="skipped: no database there"))
            else:
                steps.append(Step(place, [[certutil, "-D", "-d", database, "-n", root.nickname]], missing_ok=True))
            continue
        commands = []
        if not exists:  # Chromium's, before its first run: create it empty, as Chromium itself would
            commands += [["mkdir", "-p", directory], [certutil, "-N", "-d", database, "--empty-password"]]
        commands.append([certutil, "-A", "-d", database, "-t", "C,,", "-n", root.nickname, "-i", root.path])
        steps.append(Step(place, commands))
    return steps


# -- running and describing ---------------------------------------------------------------------

def describe(step: Step) -> list[str]:
    """The lines --dry-run prints for a step."""
    if step.skipped:
        return [f"{step.place}: {step.skipped}"]
    lines = [f"{step.place}:"]
    if step.copy:
        lines.append(f"  copy {step.copy[0]} to {step.copy[1]}")
    if step.remove:
        lines.append(f"  remove {step.remove}")
    lines += ["  " + shlex.join(command) for command in step.commands]
    return lines


def run_step(step: Step, install: bool) -> tuple[bool, str]:
    """Do a step: (succeeded, one line saying what happened)."""
    if step.skipped:
        return True, f"{step.place}: {step.skipped}"
    done = []
    try:
        if step.copy:
            os.makedirs(os.path.dirname(step.copy[1]), exist_ok=True)
            shutil.copyfile(*step.copy)
            done.append(f"copied the root to {step.copy[1]}")
        if step.remove:
            if os.path.exists(step.remove):
                os.remove(step.remove)
                done.append(f"removed {step.remove}")
            else:
                done.append(f"{step.remove} was not there")
    except OSError as exc:
        return False, f"{step.place}: failed: {exc.strerror or exc}"
    for command in step.commands:
        failure = _run(command)
        if failure is not None and step.missing_ok:  # untrust where it was never added
            return True, f"{step.place}: the root was not there"
        if failure is not None:
            return False, f"{step.place}: failed: `{shlex.join(command)}`: {failure}"
    if step.commands:
        done.append("added the root" if install else "removed the root")
    return True, f"{step.place}: {'; '.join(done)}"


def _run(command: list[str]) -> str | None:
    """None if the command succeeded, else why not (its last line of output)."""
    # stdin from /dev/null without a terminal: a tool that would prompt gets EOF and fails instead.
    stdin = None if sys.stdin.isatty() else subprocess.DEVNULL
    try:
        result = subprocess.run(command, stdin=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if result.returncode == 0:
        return None
    output = (result.stderr or result.stdout).strip().splitlines()
    return output[-1] if output else f"exit status {result.returncode}"
