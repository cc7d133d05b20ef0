/**
 * Debian's Chromium, headless, driven by puppeteer-core (which never downloads
 * a browser of its own). Tests run as root, which Chromium's sandbox refuses;
 * --no-sandbox is for that alone. A fresh profile directory per launch keeps
 * runs apart, and close() takes it away.
 */
import * as fs from 'node:fs';
import puppeteer, { type Browser, type Page } from 'puppeteer-core';
import { tempDir } from './temp-dir';

export const CHROMIUM = process.env.VBRIDGE_CHROMIUM ?? '/usr/bin/chromium';

export interface HeadlessBrowser {
  readonly browser: Browser;
  /** A new tab on url; console errors and failed requests of the page are collected in problems. */
  open(url: string): Promise<Page>;
  /** What went wrong in the pages: console errors, uncaught exceptions, requests that failed. */
  readonly problems: string[];
  close(): Promise<void>;
}

export async function launchChromium(): Promise<HeadlessBrowser> {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium`);
  const profile = tempDir('vbridge-chromium-');
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    userDataDir: profile,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check', '--disable-extensions'],
    // QEMU guests share the 2 cores: Chromium may start slowly.
    timeout: 60_000,
    protocolTimeout: 120_000,
  });
  const problems: string[] = [];
  return {
    browser,
    problems,
    open: async (url) => {
      const page = await browser.newPage();
      page.setDefaultTimeout(60_000);
      page.on('console', (m) => {
        if (m.type() === 'error') problems.push(`console: ${m.text()}`);
      });
      page.on('pageerror', (e) => problems.push(`page error: ${e instanceof Error ? e.message : String(e)}`));
      page.on('requestfailed', (r) => {
        // The event stream is cut when the page closes: that is no failure of the page.
        if (!r.url().endsWith('/v1/events')) problems.push(`request failed: ${r.url()} ${r.failure()?.errorText ?? ''}`);
      });
      await page.goto(url, { waitUntil: 'domcontentloaded' });
      return page;
    },
    close: async () => {
      await browser.close().catch(() => undefined);
      fs.rmSync(profile, { recursive: true, force: true });
    },
  };
}
