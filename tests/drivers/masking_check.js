// node-postgres through interceptor: masked values in their normal types
// (a named prepared statement, and a plain query).
// usage: node masking_check.js CONNSTRING
const assert = require('assert');
const { Client } = require('pg');

async function main() {
  const c = new Client({ connectionString: process.argv[2], ssl: false });
  await c.connect();
  const expected = [{ id: 1, card: '****1111', profile: '[redacted]', pin: null, raw: Buffer.alloc(0) }];
  const sql = 'SELECT id, card, profile, pin, raw FROM masked_t WHERE id = $1';
  const named = await c.query({ name: 'masked', text: sql, values: [1] });
  assert.deepStrictEqual(named.rows, expected);
  const plain = await c.query(sql, [1]);
  assert.deepStrictEqual(plain.rows, expected);
  await c.end();
  console.log('node pg masking OK');
}

main().catch((e) => { console.error(e); process.exit(1); });
