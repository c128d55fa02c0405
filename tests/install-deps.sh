#!/bin/sh
# Installs every Debian package that building, testing and the demo need.
# Idempotent: packages already present are skipped; apt-get runs only when
# something is missing (and then runs `apt-get update` first).
set -eu

PACKAGES="
build-essential pkg-config make gcc clang libclang-rt-14-dev clang-format
librabbitmq-dev libcurl4-openssl-dev libssl-dev libjansson-dev libsystemd-dev
libinih-dev libmicrohttpd-dev libcmocka-dev
python3 python3-pytest python3-pika rabbitmq-server
openssl curl iproute2 nftables valgrind procps systemd systemd-container
debhelper dpkg-dev fakeroot lintian rpm man-db groff-base
gpg gpg-agent gpgv
"

missing=""
for p in $PACKAGES; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing="$missing $p"
	fi
done

if [ -z "$missing" ]; then
	echo "install-deps: all packages present"
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps: missing packages:$missing (run as root to install)" >&2
	exit 1
fi

echo "install-deps: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# rabbitmq-server's postinst would start a system-wide broker; tests start
# their own nodes, so keep services from starting during the install.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
	printf '#!/bin/sh\nexit 101\n' >"$policy"
	chmod 755 "$policy"
	created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing
