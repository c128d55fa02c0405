# Turns conf/agent-sync.ini into the packaged conffile. The packaged daemon
# runs sandboxed (it cannot talk to systemd), so the agent is restarted by
# dsm-agent-sync-settings.path instead of on_change; see dsm-agent-sync.ini(5).
s|^on_change[ \t]*=.*$|# Packaged default: empty. dsm-agent-sync-settings.path restarts\
# dsm-agent.service outside the daemon's sandbox when settings_file changes.\
on_change =|
s|systemctl reload dsm-agent-sync\b|systemctl reload dsm-agent-syncd|
