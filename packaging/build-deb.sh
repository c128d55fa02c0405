#!/bin/sh
# Builds the dsm-agent-sync .deb from the working tree: copies the tree
# (without build output and VCS data) to a temporary directory, places
# packaging/debian there as debian/, runs dpkg-buildpackage -us -uc -b and
# copies the .deb (and .buildinfo/.changes) into $DSM_DEB_OUTDIR (default
# build/). Prints the path of the .deb on the last line.
#   DSM_DEB_OUTDIR   where to put the results (default <top>/build)
#   DSM_DEB_LINTIAN  1: run lintian on the result and fail on errors
#   DSM_DEB_KEEP     1: keep the temporary build tree (path is printed)
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)
out=${DSM_DEB_OUTDIR:-$top/build}
version=$(dpkg-parsechangelog -l "$top/packaging/debian/changelog" -S Version)

work=$(mktemp -d "${TMPDIR:-/tmp}/dsm-agent-sync-deb.XXXXXX")
if [ "${DSM_DEB_KEEP:-0}" = 1 ]; then
	echo "build-deb: keeping $work" >&2
else
	trap 'rm -rf "$work"' EXIT
fi
src=$work/dsm-agent-sync-$version
mkdir -p "$src"

tar -C "$top" \
	--exclude=./.git --exclude='./build' --exclude='./build-*' --exclude=./dist \
	--exclude=./debian --exclude='__pycache__' --exclude=.pytest_cache \
	-cf - . | tar -C "$src" -xf -
cp -a "$top/packaging/debian" "$src/debian"

(
	cd "$src"
	dpkg-buildpackage -us -uc -b
) >"$work/build.log" 2>&1 || {
	tail -n 60 "$work/build.log" >&2
	echo "build-deb: dpkg-buildpackage failed (full log: $work/build.log)" >&2
	trap - EXIT
	exit 1
}

mkdir -p "$out"
deb=
for f in "$work"/*.deb "$work"/*.buildinfo "$work"/*.changes; do
	[ -e "$f" ] || continue
	cp "$f" "$out/"
	case $f in
	*dbgsym*) ;;
	*.deb) deb=$out/$(basename "$f") ;;
	esac
done
[ -n "$deb" ] || {
	echo "build-deb: no .deb produced" >&2
	exit 1
}

if [ "${DSM_DEB_LINTIAN:-0}" = 1 ]; then
	lintian --fail-on error "$deb"
fi
echo "$deb"
