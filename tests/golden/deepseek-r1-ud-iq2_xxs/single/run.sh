#!/bin/sh
# Rendered by builder 0.1.0: the whole pipeline (merge, create,
# serve) in one container, for hosts that run one image and nothing else.
# `builder up --target single` runs exactly this.
set -e
docker rm -f deepseek-r1-ud-iq2-xxs 2>/dev/null || true
docker run -d \
  --name deepseek-r1-ud-iq2-xxs \
  --restart unless-stopped \
  --label io.builder.config.sha256=2f5446662ae427fce5cf9f08f5984457e42af6adc7f395737d597f1ad8eac978 \
  --label io.builder.project=deepseek-r1-ud-iq2-xxs \
  --label io.builder.role=all \
  --cap-drop ALL \
  --security-opt no-new-privileges:true \
  --read-only \
  --tmpfs /tmp:size=256m,mode=1777 \
  --pids-limit 512 \
  --publish 127.0.0.1:11434:11434 \
  --mount 'type=volume,source=deepseek-r1-ud-iq2-xxs_models,target=/models,volume-driver=local,volume-opt=type=nfs,"volume-opt=o=addr=192.0.2.10,rw,nfsvers=4.1,hard",volume-opt=device=:/export/models' \
  --health-cmd 'python3 -m supervisor health' \
  --health-interval 10s \
  --health-timeout 5s \
  --health-retries 3 \
  --health-start-period 30s \
  --gpus 2 \
  --env 'BUILDER_SERVE={"keep_alive":"-1","load_timeout":{"read_mb_s":200,"seconds":null},"parallel":{"single_above_gib":16,"value":null},"read_ahead":true}' \
  --env OLLAMA_KEEP_ALIVE=-1 builder-deepseek-r1:ud-iq2-xxs all
