/**
 * Reading the dashboard as a person sees it: the text of its cells, found by
 * the data-* attributes the page keys its DOM with (data-fn, data-queue,
 * data-rate, data-field, data-switch, data-port), and waits on what it shows.
 * The page functions are strings: they run in the browser, and the tests are
 * compiled without the DOM's types.
 */
import type { Page } from 'puppeteer-core';

/** CSS selector of a rate cell of a function's queue: fnRate('pf1/vf0', 'tx0', 'descriptors'). */
export function fnRate(fn: string, queue: string, counter: string): string {
  return `[data-fn="${fn}"] tr[data-queue="${queue}"] [data-rate="${counter}"]`;
}

/** CSS selector of a rate cell of a switch port. */
export function portRate(sw: string, port: string, counter: string): string {
  return `[data-switch="${sw}"] tr[data-port="${port}"] [data-rate="${counter}"]`;
}

/** CSS selector of a labelled field of a function's card (state, link, link-state, type, notifications, dma). */
export function fnField(fn: string, name: string): string {
  return `[data-fn="${fn}"] [data-field="${name}"]`;
}

/** Waits until the element's text satisfies test (a JS expression over `t`, the text), and returns that text. */
export async function waitForText(page: Page, selector: string, test: string, timeoutMs = 60_000): Promise<string> {
  const h = await page.waitForFunction(`(() => { const e = document.querySelector(${JSON.stringify(selector)}); if (e === null) return false; const t = e.textContent; return (${test}) ? t : false; })()`, { timeout: timeoutMs, polling: 100 });
  return (await h.jsonValue()) as string;
}

/** Waits until the rate the cell shows (its leading number, "20.0/s" or "1.2 kB/s") is above zero; returns the text. */
export function waitForNonZeroRate(page: Page, selector: string, timeoutMs?: number): Promise<string> {
  return waitForText(page, selector, 'parseFloat(t) > 0', timeoutMs);
}

/** The highest point the queue row's sparkline draws, as a fraction of its height (0 for a flat line at zero). */
export async function sparkPeak(page: Page, rowSelector: string): Promise<number> {
  const points = String(await page.evaluate(`document.querySelector(${JSON.stringify(`${rowSelector} svg.spark polyline`)})?.getAttribute('points') ?? ''`));
  const ys = points
    .split(' ')
    .filter((p) => p !== '')
    .map((p) => Number(p.split(',')[1]));
  // The page draws y = 22 for zero and 2 for the peak of the last minute.
  return ys.length === 0 ? 0 : (22 - Math.min(...ys)) / 20;
}
