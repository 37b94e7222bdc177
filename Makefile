# Installs stillsvc's system files where a distribution puts them.
#
#   make install           units, sysusers, D-Bus policy and activation file,
#                          interface XML, udev rules, polkit actions
#   make uninstall         removes exactly those files again
#   make install-python    the Python package and its commands (stillsvc, stillctl)
#   make check-units       systemd-analyze verify on the units
#
# Variables: DESTDIR (staging root, empty for the live system), PREFIX or
# prefix (/usr), bindir (where the commands are, see below), sysconfdir
# (/etc), PYTHON (python3), PIP_FLAGS (extra pip options), EXTRAS (optional
# dependency groups for install-python, e.g. EXTRAS=udev,usb), and each target
# folder below. Keep PREFIX=/usr for a working system: D-Bus, polkit and udev
# read their files from /usr only (and /etc).
#
# `make install` leaves the Python package alone because a distribution
# package installs that itself (Debian: pybuild); `make install-python` does
# it with pip for everyone else, with its dependencies. Nothing goes into
# sysconfdir: every file here is a vendor file, which administrators override
# in /etc. sysconfdir and bindir are written into the installed units'
# ExecStart= and comments.
#
# bindir: a package build (DESTDIR set) has its commands in $(exec_prefix)/bin.
# On the live system they are where `make install-python` puts them, the
# scripts folder of $(PYTHON): <venv>/bin for a virtual environment,
# /usr/local/bin for Debian's own python3. So `make install-python install
# PYTHON=/opt/stillsvc/bin/python3` gives units that run
# /opt/stillsvc/bin/stillsvc. Set bindir= to say otherwise.
#
# After installing on a live system: systemd-sysusers, systemctl daemon-reload,
# udevadm control --reload (see README.md, "Installing as a system service").

PREFIX ?= /usr
prefix ?= $(PREFIX)
exec_prefix ?= $(prefix)
PYTHON ?= python3
PIP_FLAGS ?=
ifeq ($(origin bindir),undefined)
ifeq ($(DESTDIR),)
bindir := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
else
bindir := $(exec_prefix)/bin
endif
endif
datadir ?= $(prefix)/share
sysconfdir ?= /etc

# Not $(libdir): these are arch-independent and always below lib/.
systemdsystemunitdir ?= $(prefix)/lib/systemd/system
systemduserunitdir ?= $(prefix)/lib/systemd/user
sysusersdir ?= $(prefix)/lib/sysusers.d
udevrulesdir ?= $(prefix)/lib/udev/rules.d
dbussystemdir ?= $(datadir)/dbus-1/system.d
dbussystemservicesdir ?= $(datadir)/dbus-1/system-services
dbusinterfacesdir ?= $(datadir)/dbus-1/interfaces
polkitactionsdir ?= $(datadir)/polkit-1/actions

SYSTEMD_ANALYZE ?= systemd-analyze
INSTALL ?= install
INSTALL_DATA ?= $(INSTALL) -m 0644
INSTALL_DIR ?= $(INSTALL) -d -m 0755

BUS_NAME := org.stillsvc.StillImage1
SYSTEM_UNITS := systemd/stillsvc.service systemd/stillsvc-saned.socket systemd/stillsvc-escl.socket
USER_UNITS := systemd/stillsvc-agent.service
INTERFACES := $(sort $(wildcard dbus/$(BUS_NAME).*.xml))
UDEV_RULES := udev/70-stillsvc.rules
# The polkit actions are installed when the file is there.
POLKIT_POLICY := $(wildcard policy/$(BUS_NAME).policy)

# Where the installed units find the commands and the configuration.
UNIT_PATHS := -e 's|/usr/bin/|$(bindir)/|g' -e 's|/etc/stillsvc|$(sysconfdir)/stillsvc|g'

.PHONY: all install uninstall install-python check-units

all:
	@echo "Nothing to build. Targets: install, uninstall, install-python, check-units."

install:
	$(INSTALL_DIR) $(DESTDIR)$(systemdsystemunitdir) $(DESTDIR)$(systemduserunitdir)
	for u in $(SYSTEM_UNITS); do dest="$(DESTDIR)$(systemdsystemunitdir)/$${u##*/}"; \
		sed $(UNIT_PATHS) "$$u" > "$$dest" && chmod 0644 "$$dest" || exit 1; done
	for u in $(USER_UNITS); do dest="$(DESTDIR)$(systemduserunitdir)/$${u##*/}"; \
		sed $(UNIT_PATHS) "$$u" > "$$dest" && chmod 0644 "$$dest" || exit 1; done
	$(INSTALL_DIR) $(DESTDIR)$(sysusersdir)
	$(INSTALL_DATA) systemd/stillsvc.sysusers $(DESTDIR)$(sysusersdir)/stillsvc.conf
	$(INSTALL_DIR) $(DESTDIR)$(dbussystemdir)
	$(INSTALL_DATA) dbus/$(BUS_NAME).conf $(DESTDIR)$(dbussystemdir)/$(BUS_NAME).conf
	$(INSTALL_DIR) $(DESTDIR)$(dbussystemservicesdir)
	$(INSTALL_DATA) dbus/$(BUS_NAME).service $(DESTDIR)$(dbussystemservicesdir)/$(BUS_NAME).service
	$(INSTALL_DIR) $(DESTDIR)$(dbusinterfacesdir)
	$(INSTALL_DATA) $(INTERFACES) $(DESTDIR)$(dbusinterfacesdir)/
	$(INSTALL_DIR) $(DESTDIR)$(udevrulesdir)
	$(INSTALL_DATA) $(UDEV_RULES) $(DESTDIR)$(udevrulesdir)/
ifneq ($(POLKIT_POLICY),)
	$(INSTALL_DIR) $(DESTDIR)$(polkitactionsdir)
	$(INSTALL_DATA) $(POLKIT_POLICY) $(DESTDIR)$(polkitactionsdir)/
endif

# Folders are left in place: all of them are shared with other packages.
uninstall:
	rm -f $(addprefix $(DESTDIR)$(systemdsystemunitdir)/,$(notdir $(SYSTEM_UNITS)))
	rm -f $(addprefix $(DESTDIR)$(systemduserunitdir)/,$(notdir $(USER_UNITS)))
	rm -f $(DESTDIR)$(sysusersdir)/stillsvc.conf
	rm -f $(DESTDIR)$(dbussystemdir)/$(BUS_NAME).conf
	rm -f $(DESTDIR)$(dbussystemservicesdir)/$(BUS_NAME).service
	rm -f $(addprefix $(DESTDIR)$(dbusinterfacesdir)/,$(notdir $(INTERFACES)))
	rm -f $(addprefix $(DESTDIR)$(udevrulesdir)/,$(notdir $(UDEV_RULES)))
	rm -f $(DESTDIR)$(polkitactionsdir)/$(BUS_NAME).policy

# Into $(PYTHON)'s own folders (its default install scheme), so the commands
# land in the bindir above. A Python that the distribution manages refuses
# (PEP 668, Debian 12): use a virtual environment (README.md), or
# PIP_FLAGS=--break-system-packages to install below /usr/local anyway.
# pip cannot uninstall from a staging root; on a live system: pip uninstall stillsvc.
install-python:
	$(PYTHON) -m pip install $(PIP_FLAGS) $(if $(DESTDIR),--root=$(DESTDIR)) ".$(if $(EXTRAS),[$(EXTRAS)])"
	@echo "stillsvc and stillctl are in $(bindir)"

# systemd-analyze verify fails a unit whose ExecStart= names a file that does
# not exist or is not executable ("Command /usr/bin/stillsvc is not
# executable"), which is the case wherever the package is not installed in
# /usr, such as a build machine or CI. So the units are checked as copies
# whose ExecStart= names an executable that exists ($(CHECK_EXEC)); everything
# else is verified as written. Unknown keys and values that do not parse are
# only warnings to verify (exit status 0), so any output at all fails the
# check. The user unit needs a user manager's runtime folder, hence
# XDG_RUNTIME_DIR.
CHECK_EXEC ?= /bin/true

check-units:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	mkdir -m 0700 "$$tmp/system" "$$tmp/user" "$$tmp/runtime"; \
	for u in $(SYSTEM_UNITS); do \
		sed -e 's|^ExecStart=/[^ ]*|ExecStart=$(CHECK_EXEC)|' "$$u" > "$$tmp/system/$${u##*/}"; \
	done; \
	for u in $(USER_UNITS); do \
		sed -e 's|^ExecStart=/[^ ]*|ExecStart=$(CHECK_EXEC)|' "$$u" > "$$tmp/user/$${u##*/}"; \
	done; \
	status=0; \
	for u in "$$tmp"/system/*; do \
		echo "systemd-analyze verify $${u##*/}"; \
		if ! (cd "$$tmp/system" && $(SYSTEMD_ANALYZE) verify "./$${u##*/}") > "$$tmp/out" 2>&1 \
			|| [ -s "$$tmp/out" ]; then cat "$$tmp/out"; status=1; fi; \
	done; \
	for u in "$$tmp"/user/*; do \
		echo "systemd-analyze --user verify $${u##*/}"; \
		if ! (cd "$$tmp/user" && XDG_RUNTIME_DIR="$$tmp/runtime" \
			$(SYSTEMD_ANALYZE) --user verify "./$${u##*/}") > "$$tmp/out" 2>&1 \
			|| [ -s "$$tmp/out" ]; then cat "$$tmp/out"; status=1; fi; \
	done; \
	if [ $$status -eq 0 ]; then echo "units OK"; fi; \
	exit $$status
