#!/bin/sh
# Rendered by builder 0.1.0: the whole pipeline (merge, create,
# serve) in one container, for hosts that run one image and nothing else.
# `builder up --target single` runs exactly this.
set -e
docker rm -f deepseek-r1-ud-q2-k-xl 2>/dev/null || true
docker run -d \
  --name deepseek-r1-ud-q2-k-xl \
  --restart unless-stopped \
  --label io.builder.config.sha256=7850e5d15e60a8051e22436c13203c5bf607d4f90eb41e5f9137556f40d66c0f \
  --label io.builder.project=deepseek-r1-ud-q2-k-xl \
  --label io.builder.role=all \
  --cap-drop ALL \
  --security-opt no-new-privileges:true \
  --read-only \
  --tmpfs /tmp:size=256m,mode=1777 \
  --pids-limit 512 \
  --publish 127.0.0.1:11434:11434 \
  --mount 'type=volume,source=deepseek-r1-ud-q2-k-xl_models,target=/models,volume-driver=local,volume-opt=type=nfs,"volume-opt=o=addr=192.0.2.10,rw,nfsvers=4.1,hard",volume-opt=device=:/export/models' \
  --health-cmd 'python3 -m supervisor health' \
  --health-interval 10s \
  --health-timeout 5s \
  --health-retries 3 \
  --health-start-period 30s \
  --gpus 2 \
  --env 'BUILDER_SERVE={"keep_alive":"-1","load_timeout":{"read_mb_s":200,"seconds":null},"parallel":{"single_above_gib":16,"value":null},"read_ahead":true}' \
  --env OLLAMA_KEEP_ALIVE=-1 builder-deepseek-r1:ud-q2-k-xl all
