"""Debian packages for tests: the project's own .deb (packaging/build-deb.sh)
and a tiny stand-in for the DSM agent package that an update installs."""

import os
import subprocess

from . import util

BUILD_DEB = os.path.join(util.REPO_ROOT, "packaging", "build-deb.sh")


def build_project_deb(outdir, timeout=600):
    """Builds the .deb from the working tree into outdir; returns its path.
    The build must not inherit a calling make's variables (SANITIZE=1)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["DSM_DEB_OUTDIR"] = outdir
    r = subprocess.run([BUILD_DEB], capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError("build-deb.sh failed (%d):\n%s" % (r.returncode, r.stderr[-4000:]))
    return r.stdout.strip().splitlines()[-1]


def build_agent_deb(workdir, version, package="dsm-agent"):
    """A minimal package standing for the DSM agent: it ships the agent's
    version file (/etc/dsm-agent/VERSION, the daemon's agent_version_file)
    and a marker under /usr/share. Returns the .deb's path."""
    root = os.path.join(workdir, "%s-%s" % (package, version))
    os.makedirs(os.path.join(root, "DEBIAN"), exist_ok=True)
    os.makedirs(os.path.join(root, "etc/dsm-agent"), exist_ok=True)
    os.makedirs(os.path.join(root, "usr/share/%s" % package), exist_ok=True)
    with open(os.path.join(root, "DEBIAN/control"), "w") as f:
        f.write("Package: %s\nVersion: %s\nArchitecture: all\nMaintainer: Tests <tests@example.com>\n"
                "Section: admin\nPriority: optional\n"
                "Description: stand-in for the DSM agent (tests)\n" % (package, version))
    with open(os.path.join(root, "etc/dsm-agent/VERSION"), "w") as f:
        f.write(version + "\n")
    with open(os.path.join(root, "usr/share/%s/installed-by-update" % package), "w") as f:
        f.write(version + "\n")
    out = os.path.join(workdir, "%s_%s_all.deb" % (package, version))
    r = subprocess.run(["dpkg-deb", "--root-owner-group", "--build", root, out],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("dpkg-deb: %s" % r.stderr)
    return out
