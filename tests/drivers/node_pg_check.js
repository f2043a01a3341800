// node-postgres through interceptor: parameters, named prepared statements,
// COPY both ways (pg-copy-streams), LISTEN/NOTIFY, commit and rollback.
// usage: node node_pg_check.js CONNSTRING SUFFIX [CAFILE]
const fs = require('fs');
const assert = require('assert');
const { Client } = require('pg');
const { from: copyFrom, to: copyTo } = require('pg-copy-streams');
const { pipeline } = require('stream/promises');
const { Readable, Writable } = require('stream');

async function main() {
  const [conn, suffix, cafile] = process.argv.slice(2);
  const ssl = cafile ? { ca: fs.readFileSync(cafile), servername: 'localhost' } : false;
  const table = `node_${suffix}`;
  const c = new Client({ connectionString: conn, ssl });
  await c.connect();
  await c.query(`DROP TABLE IF EXISTS ${table}`);
  await c.query(`CREATE TABLE ${table} (id int PRIMARY KEY, name text, amount numeric)`);
  for (let i = 0; i < 30; i++) {
    await c.query({ name: 'ins', text: `INSERT INTO ${table} VALUES ($1, $2, $3)`, values: [i, `n${i}`, i * 1.5] });
  }
  const r = await c.query({ name: 'one', text: `SELECT name, amount FROM ${table} WHERE id = $1`, values: [3] });
  assert.deepStrictEqual(r.rows, [{ name: 'n3', amount: '4.5' }]);

  await c.query('BEGIN');
  await c.query(`DELETE FROM ${table}`);
  await c.query('ROLLBACK');
  assert.strictEqual((await c.query(`SELECT count(*)::int AS n FROM ${table}`)).rows[0].n, 30);
  await c.query('BEGIN');
  await c.query(`UPDATE ${table} SET name = 'committed' WHERE id = 0`);
  await c.query('COMMIT');

  const lines = [];
  for (let i = 100; i < 2100; i++) lines.push(`${i}\tcopied ${i}\t${i}\n`);
  await pipeline(Readable.from(lines), c.query(copyFrom(`COPY ${table} FROM STDIN`)));
  const chunks = [];
  await pipeline(
    c.query(copyTo(`COPY (SELECT id FROM ${table} WHERE id >= 100 ORDER BY id) TO STDOUT`)),
    new Writable({ write(chunk, _e, cb) { chunks.push(chunk); cb(); } }),
  );
  const ids = Buffer.concat(chunks).toString().trim().split('\n');
  assert.strictEqual(ids.length, 2000);
  assert.strictEqual(ids[0], '100');

  await assert.rejects(c.query('SELECT 1/0'), (e) => e.code === '22012');

  const note = new Promise((resolve) => c.on('notification', resolve));
  await c.query(`LISTEN node_ch_${suffix}`);
  const other = new Client({ connectionString: conn, ssl });
  await other.connect();
  await other.query(`SELECT pg_notify('node_ch_${suffix}', 'node payload')`);
  await other.end();
  const n = await Promise.race([note, new Promise((_, rej) => setTimeout(() => rej(new Error('no notification')), 10000))]);
  assert.strictEqual(n.channel, `node_ch_${suffix}`);
  assert.strictEqual(n.payload, 'node payload');

  assert.strictEqual((await c.query(`SELECT name FROM ${table} WHERE id = 0`)).rows[0].name, 'committed');
  await c.query(`DROP TABLE ${table}`);
  await c.end();
  console.log('node pg OK');
}

main().catch((e) => { console.error(e); process.exit(1); });
