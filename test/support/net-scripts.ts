/** Guest scripts shared by the two-guest network tests (local switch and PCIe backend). */
// RFC 2544 benchmark range: the guests talk only through the bridge.
export const IP_A = '198.18.0.1';
export const IP_B = '198.18.0.2';

/** VIRTIO_F_RING_PACKED as negotiated: the features file has one character per bit, bit 0 first. */
const FEATURE34 = 'echo FEATURE34=$(cut -c35 /sys/class/net/eth0/device/features)';

/**
 * Guest A serves an 8 MiB blob; with twoCpus it pings B from each vCPU so that both TX queues carry traffic.
 * `extra` runs once the blob is served (e.g. a second NIC's set-up).
 */
export function scriptA(twoCpus: boolean, extra = ''): string {
  return `
ip link set eth0 up && ip addr add ${IP_A}/24 dev eth0
echo QUEUES=$(ls -d /sys/class/net/eth0/queues/tx-* | wc -l)
${FEATURE34}
mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=1M count=8 2>/dev/null
echo BLOB_MD5=$(md5sum < /www/blob | cut -d' ' -f1)
httpd -p 8080 -h /www
${extra}
# XPS maps CPU n to TX queue n.
until ping -c1 -W1 ${IP_B} >/dev/null 2>&1; do sleep 0.2; done
echo A_PING0="$(${twoCpus ? 'taskset 1 ' : ''}ping -q -c 20 -i 0.02 ${IP_B} | grep -o '[0-9]* packets received')"
echo A_PING1="$(${twoCpus ? 'taskset 2 ' : ''}ping -q -c 20 -i 0.02 -s 1400 ${IP_B} | grep -o '[0-9]* packets received')"
# B publishes /done on its own httpd when it has fetched the blob.
n=0; until wget -q -O /dev/null http://${IP_B}:8080/done; do n=$((n+1)); [ $n -gt 300 ] && break; sleep 0.5; done
echo A_DONE=$((n <= 300))
`;
}

/** Guest B pings A and fetches its blob; `extra` runs after that, before B tells A it is done (A serves until then). */
export function scriptB(extra = ''): string {
  return `
ip link set eth0 up && ip addr add ${IP_B}/24 dev eth0
${FEATURE34}
until ping -c1 -W1 ${IP_A} >/dev/null 2>&1; do sleep 0.2; done
echo PING56="$(ping -q -c 100 -i 0.02 ${IP_A} | grep -o '[0-9]* packets transmitted, [0-9]* packets received')"
echo PING1400="$(ping -q -c 100 -i 0.02 -s 1400 ${IP_A} | grep -o '[0-9]* packets transmitted, [0-9]* packets received')"
n=0; until wget -q -O /tmp/blob http://${IP_A}:8080/blob; do n=$((n+1)); [ $n -gt 30 ] && break; sleep 1; done
echo GOT_MD5=$(md5sum < /tmp/blob | cut -d' ' -f1)
echo GOT_SIZE=$(wc -c < /tmp/blob)
${extra}
mkdir -p /www && echo ok > /www/done && httpd -p 8080 -h /www
# Stay up until A has seen /done.
sleep 5
`;
}

export const SCRIPT_B = scriptB();

