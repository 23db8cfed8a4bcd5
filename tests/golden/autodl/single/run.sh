#!/bin/sh
# Rendered by builder 0.1.0: the whole pipeline (merge, create,
# serve) in one container, for hosts that run one image and nothing else.
# `builder up --target single` runs exactly this.
set -e
docker rm -f autodl 2>/dev/null || true
docker run -d \
  --name autodl \
  --restart unless-stopped \
  --label io.builder.config.sha256=8c8c8b585d13fc48bd597a71524887f172dd20a67b6c8940276ed459f5143648 \
  --label io.builder.project=autodl \
  --label io.builder.role=all \
  --cap-drop ALL \
  --security-opt no-new-privileges:true \
  --read-only \
  --tmpfs /tmp:size=256m,mode=1777 \
  --pids-limit 512 \
  --publish 0.0.0.0:6006:11434 \
  --mount type=bind,source=/root/autodl-tmp,target=/models \
  --mount type=bind,source=/srv/builder/api-keys,target=/run/secrets/builder-keys,readonly \
  --health-cmd 'python3 -m supervisor health' \
  --health-interval 10s \
  --health-timeout 5s \
  --health-retries 3 \
  --health-start-period 30s \
  --gpus 2 \
  --env 'BUILDER_SERVE={"keep_alive":"-1","load_timeout":{"read_mb_s":500,"seconds":null},"parallel":{"single_above_gib":16,"value":null},"read_ahead":true}' \
  --env 'BUILDER_GATE={"keys":"/run/secrets/builder-keys","listen":"0.0.0.0:11434","upstream":11435}' builder-deepseek-r1:ud-iq1-m all
