/** What `vbridge stats` prints instead of raw numbers: queue names, status bits, durations, rates. */
import { STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET } from '../virtio/constants';

/**
 * The spec's queue names: net has receiveq/transmitq pairs (rx0, tx0, rx1, ...) and,
 * when their count is odd, a control queue last; blk has request queues.
 */
export function queueLabel(type: string, index: number, count: number): string {
  if (type === 'net') {
    if (count % 2 === 1 && index === count - 1) return 'ctrl';
    return `${index % 2 === 0 ? 'rx' : 'tx'}${Math.floor(index / 2)}`;
  }
  if (type === 'blk') return `requestq${index}`;
  return String(index);
}

const STATUS_BITS: [number, string][] = [
  [STATUS_ACKNOWLEDGE, 'ACKNOWLEDGE'],
  [STATUS_DRIVER, 'DRIVER'],
  [STATUS_FEATURES_OK, 'FEATURES_OK'],
  [STATUS_DRIVER_OK, 'DRIVER_OK'],
  [STATUS_NEEDS_RESET, 'NEEDS_RESET'],
  [STATUS_FAILED, 'FAILED'],
];

/** 0x0f -> "ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK"; 0 -> "reset"; unknown bits in hex. */
export function decodeStatus(status: number): string {
  if (status === 0) return 'reset';
  const names = STATUS_BITS.filter(([bit]) => (status & bit) !== 0).map(([, n]) => n);
  const rest = status & ~STATUS_BITS.reduce((m, [bit]) => m | bit, 0);
  if (rest !== 0) names.push(`0x${rest.toString(16)}`);
  return names.join('|');
}

/** 3725 -> "1h02m05s". */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  if (h > 0) return `${h}h${String(m).padStart(2, '0')}m${String(sec).padStart(2, '0')}s`;
  if (m > 0) return `${m}m${String(sec).padStart(2, '0')}s`;
  return `${sec}s`;
}

/** 1536 -> "1.5K", per second figures with a unit that keeps them short. */
export function formatRate(perSecond: number): string {
  const units = ['', 'K', 'M', 'G', 'T'];
  let v = perSecond;
  let u = 0;
  while (v >= 1000 && u < units.length - 1) {
    v /= 1000;
    u++;
  }
  return `${v >= 100 || u === 0 ? Math.round(v) : v.toFixed(1)}${units[u]}`;
}
