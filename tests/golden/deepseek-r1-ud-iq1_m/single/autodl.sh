#!/bin/bash
# Rendered by builder 0.1.0: run the stack inside an AutoDL
# instance, which is itself a container (no Docker, no systemd; only ports
# 6006 and 6008 reach the outside; the data disk is /root/autodl-tmp).
#
# 1. On a machine with Docker: `builder build`, then copy this whole context
#    folder (with staged/ and rootfs/) to the instance, e.g. to /root/context.
# 2. Put the shards on the data disk: /root/autodl-tmp/DeepSeek-R1-UD-IQ1_M/
#    (the merge needs as much free space again for the merged file).
# 3. In the instance, from the context folder: bash single/autodl.sh
# 4. serve.auth is none: the endpoint listens on 127.0.0.1 only, with no
#    authentication (ollama has none).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cp -a "$here/staged/ollama/." /usr/local/
cp -a "$here/staged/llama.cpp/." /opt/
cp -a "$here/rootfs/." /
mkdir -p /root/autodl-tmp
# The image's paths: the model storage is the data disk.
[ -e /models ] || ln -s /root/autodl-tmp /models
export OLLAMA_HOST=127.0.0.1:6006
export OLLAMA_MODELS=/models/ollama
export LD_LIBRARY_PATH=/opt/llama.cpp/build/bin
export PYTHONPATH=/opt/builder
export PYTHONDONTWRITEBYTECODE=1
export BUILDER_SERVE='{"keep_alive":"-1","load_timeout":{"read_mb_s":200,"seconds":null},"parallel":{"single_above_gib":16,"value":null},"read_ahead":true}'
export OLLAMA_KEEP_ALIVE=-1

nohup python3 -m supervisor all >> /root/autodl-tmp/builder-serve.log 2>&1 &
echo "started (pid $!); log: /root/autodl-tmp/builder-serve.log; endpoint: http://127.0.0.1:6006"
