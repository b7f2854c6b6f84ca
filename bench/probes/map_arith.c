// In-cache cost of the backward map's arithmetic variants (64 x 1024 f32, one thread,
// best of 200 calls, ns per value). Build and run (outside CI):
//   gcc -O2 -march=native map_arith.c -o map_arith && ./map_arith
// Quoted in bench/RESULTS.md ("Seventh session"): the f32<->f64 conversions alone cost
// more than the whole f32 map.
// in-cache cost of map variants (64 x 1024 f32), one thread
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define C 1024
#define R 64
float *x,*dy,*dx; double *tm,*ta,*tb,*tk,*tk2; float *fm,*fa,*fb,*fk;
__attribute__((noinline)) void f64(){ for(long r=0;r<R;r++) for(long j=0;j<C;j+=8){ long i=r*C+j;
  __m512d X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)), D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i));
  __m512d v=_mm512_fmadd_pd(_mm512_loadu_pd(ta+j),D,_mm512_fmadd_pd(_mm512_loadu_pd(tb+j),_mm512_sub_pd(X,_mm512_loadu_pd(tm+j)),_mm512_loadu_pd(tk+j)));
  _mm256_storeu_ps(dx+i,_mm512_cvtpd_ps(v));}}
__attribute__((noinline)) void f64r2(){ for(long r=0;r<R;r+=2) for(long j=0;j<C;j+=8){
  __m512d m=_mm512_loadu_pd(tm+j),a=_mm512_loadu_pd(ta+j),b=_mm512_loadu_pd(tb+j),k=_mm512_loadu_pd(tk+j);
  for(int q=0;q<2;q++){ long i=(r+q)*C+j;
  __m512d X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)), D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i));
  _mm256_storeu_ps(dx+i,_mm512_cvtpd_ps(_mm512_fmadd_pd(a,D,_mm512_fmadd_pd(b,_mm512_sub_pd(X,m),k))));}}}
__attribute__((noinline)) void f64c3(){ for(long r=0;r<R;r++) for(long j=0;j<C;j+=8){ long i=r*C+j;
  __m512d X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)), D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i));
  __m512d v=_mm512_fmadd_pd(_mm512_loadu_pd(ta+j),D,_mm512_fmadd_pd(_mm512_loadu_pd(tb+j),X,_mm512_loadu_pd(tk2+j)));
  _mm256_storeu_ps(dx+i,_mm512_cvtpd_ps(v));}}
__attribute__((noinline)) void f64y(){ for(long r=0;r<R;r++) for(long j=0;j<C;j+=4){ long i=r*C+j;
  __m256d X=_mm256_cvtps_pd(_mm_loadu_ps(x+i)), D=_mm256_cvtps_pd(_mm_loadu_ps(dy+i));
  __m256d v=_mm256_fmadd_pd(_mm256_loadu_pd(ta+j),D,_mm256_fmadd_pd(_mm256_loadu_pd(tb+j),_mm256_sub_pd(X,_mm256_loadu_pd(tm+j)),_mm256_loadu_pd(tk+j)));
  _mm_storeu_ps(dx+i,_mm256_cvtpd_ps(v));}}
__attribute__((noinline)) void f32m(){ for(long r=0;r<R;r++) for(long j=0;j<C;j+=16){ long i=r*C+j;
   __m512 X=_mm512_loadu_ps(x+i),D=_mm512_loadu_ps(dy+i);
   _mm512_storeu_ps(dx+i,_mm512_fmadd_ps(_mm512_loadu_ps(fa+j),D,_mm512_fmadd_ps(_mm512_loadu_ps(fb+j),_mm512_sub_ps(X,_mm512_loadu_ps(fm+j)),_mm512_loadu_ps(fk+j))));}}
__attribute__((noinline)) void triv(){ for(long i=0;i<R*C;i+=16) _mm512_storeu_ps(dx+i,_mm512_add_ps(_mm512_loadu_ps(x+i),_mm512_loadu_ps(dy+i)));}
// conversions only
__attribute__((noinline)) void cvt(){ for(long i=0;i<R*C;i+=8){ __m512d X=_mm512_cvtps_pd(_mm256_loadu_ps(x+i)), D=_mm512_cvtps_pd(_mm256_loadu_ps(dy+i)); _mm256_storeu_ps(dx+i,_mm512_cvtpd_ps(_mm512_add_pd(X,D)));}}
typedef void(*fn)();
int main(){
 x=aligned_alloc(64,R*C*4);dy=aligned_alloc(64,R*C*4);dx=aligned_alloc(64,R*C*4);
 tm=aligned_alloc(64,C*8);ta=aligned_alloc(64,C*8);tb=aligned_alloc(64,C*8);tk=aligned_alloc(64,C*8);tk2=aligned_alloc(64,C*8);
 fm=aligned_alloc(64,C*4);fa=aligned_alloc(64,C*4);fb=aligned_alloc(64,C*4);fk=aligned_alloc(64,C*4);
 for(long i=0;i<R*C;i++){x[i]=i%97*0.1f;dy[i]=i%13*0.2f;}
 for(int c=0;c<C;c++){tm[c]=fm[c]=3;ta[c]=fa[c]=1.1;tb[c]=fb[c]=-0.01;tk[c]=fk[c]=tk2[c]=0.02;}
 fn f[]={f64,f64r2,f64c3,f64y,f32m,triv,cvt}; const char*nm[]={"f64 zmm","f64 rows2","f64 3coef","f64 ymm","f32","trivial","cvt only"};
 for(int v=0;v<7;v++){ double best=1e9; for(int k=0;k<200;k++){double t=now(); f[v](); t=now()-t; if(t<best)best=t;} printf("%-10s %.3f ns/elem\n",nm[v],best*1e9/(R*C)); }
}
